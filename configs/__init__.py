"""Experiment configs (ml_collections files); shared sections in configs/common.py."""
