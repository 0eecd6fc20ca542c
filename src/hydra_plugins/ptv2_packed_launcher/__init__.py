"""ptv2's Hydra launcher plugin: `hydra/launcher=packed` (see ptv2.commands.packed)."""
