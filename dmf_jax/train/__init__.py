"""Training: config, steps, partitioner, optimizers, metrics, writers, checkpoints, runs, the loop, ablations."""
