"""The model: backbone loading, prefix injection (the one module touching transformers internals), prompt modules,
heads, the one model class and the prompt-method registry."""
