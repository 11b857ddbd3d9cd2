"""Training: the DeepSpeed loop, task losses and metrics, checkpoints, preemption, evaluation."""
