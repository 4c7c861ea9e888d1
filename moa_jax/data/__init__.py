"""Data: synthetic long-context tasks (tasks.py), word lists, LongBench loader."""
