"""kdbench: a reproducible benchmark suite and leaderboard for knowledge distillation.

The Python API (``kdbench.api``) is imported on first use, so that the command line starts without torch.
"""

import sys
import types

__version__ = "0.1.0"
__all__ = ["DistillReport", "distill", "evaluate", "measure"]


def __getattr__(name: str):
    if name in __all__:
        from kdbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``kdbench.measure`` stays the API function: importing the submodule ``kdbench.measure`` does not bind it
    over the function (``from kdbench.measure import …`` reads sys.modules and is unaffected)."""

    def __setattr__(self, name: str, value) -> None:
        if name != "measure":
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
