"""The training loop and what it relies on: optimizer, checkpoints, metrics."""
