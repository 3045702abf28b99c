"""Training: the trainer, checkpoints and crash-safe I/O."""
