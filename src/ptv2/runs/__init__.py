"""Run bookkeeping: run directories, checkpoints, resumable training state, progress and experiment tracking."""
