"""The worker process (runs as the run's owner, imports torch): where a run trains."""
