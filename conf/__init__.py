"""Hydra config tree of ptv2 (packaged so the console script finds it)."""
