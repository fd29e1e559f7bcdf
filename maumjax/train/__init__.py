"""Training: train state, optimiser recipe, data-parallel step, checkpoints, logs, loop."""
