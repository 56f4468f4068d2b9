"""kdbench: a reproducible benchmark suite and leaderboard for knowledge distillation.

The Python API (``kdbench.api``) is imported on first use, so that the command line starts without torch.
"""

__version__ = "0.1.0"
__all__ = ["DistillReport", "distill", "evaluate", "measure"]


def __getattr__(name: str):
    if name in __all__:
        from kdbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")
