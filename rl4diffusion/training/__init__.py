"""Training: the accelerate-native trainer, checkpoints, evaluation and the run log."""
