"""ptv2: P-Tuning v2 (deep prompt tuning) experiments on NLU benchmarks."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)
