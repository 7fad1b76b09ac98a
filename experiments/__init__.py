"""Experiment recipes (one per track) called by run.py, and result aggregation (`python -m experiments.tables`)."""
