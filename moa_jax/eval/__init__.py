"""Evaluation: answer metrics, the method-comparison harness and its plots."""
