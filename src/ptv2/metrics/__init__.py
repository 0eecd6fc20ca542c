"""Metrics as plain functions: predictions and gold in, scores out (SuperGLUE, SQuAD, tagging)."""
