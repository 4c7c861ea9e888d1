"""Calibration data: sources (MultiNews, JSONL), prompts (every chat template), build."""
