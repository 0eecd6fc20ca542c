"""The `ptv2` commands: each reads its config top to bottom (data, model, loop or measurement, results)."""
