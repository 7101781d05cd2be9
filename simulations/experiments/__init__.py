"""Experiment runners and probes over the app: the comparison grid, recalibration, probes."""
