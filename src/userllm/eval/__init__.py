"""Evaluation: ranking metrics (and, later, the task metrics)."""
