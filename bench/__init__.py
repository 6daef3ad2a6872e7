"""pipetrain's benchmarks: ``python -m bench`` is the main job (see README)."""
