"""kdbench: a reproducible benchmark suite and leaderboard for knowledge distillation."""

__version__ = "0.1.0"
