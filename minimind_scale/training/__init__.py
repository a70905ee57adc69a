"""Training: the stage registry, the one loop on Accelerate, setup, checkpoints, launch, telemetry."""
