"""The benchmark of `kvatlas bench`: its task suite (tasks.py), metrics (metrics.py) and data readers (readers.py)."""
