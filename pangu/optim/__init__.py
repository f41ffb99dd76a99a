"""Optimizers (S3, scale-invariant SGD) and their registry, learning-rate schedules and
parameter groups. Import the submodules: `pangu.optim.registry` imports no torch."""
