"""Where kdbench finds what it ships and keeps local state; a leaf module without torch.

Shipped with kdbench: the method files (``methods/``), the suite files (``benchmarks/suites/``) and the
published numbers (``benchmarks/reference/``) and the tuning files (``benchmarks/tuning/``). In a checkout, or an editable install, these are the repository's
own folders; a wheel carries copies of them inside the package (``kdbench/shipped/``, see pyproject.toml).

Local state lives under ``$KDBENCH_HOME`` (default ``./.kdbench``): ``mlflow.db`` and ``mlartifacts/`` (the
local MLflow store), ``teachers/`` (trained teachers), ``teacher_outputs/`` (their cached outputs),
``checkpoints/`` (training state of unfinished runs), ``datasets/`` (the Hugging Face datasets cache) and
``machine.lock`` (timings take the machine to themselves).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The repository kdbench runs from, or None when it runs from an installed wheel.
CHECKOUT: Path | None = _PACKAGE.parent if (_PACKAGE.parent / "pyproject.toml").is_file() \
    and (_PACKAGE.parent / "methods").is_dir() else None
# Where each shipped folder is in the repository; the wheel maps it to kdbench/shipped/<name>.
_SHIPPED = {"methods": "methods", "suites": "benchmarks/suites", "reference": "benchmarks/reference",
            "tuning": "benchmarks/tuning"}


def shipped(name: str) -> Path:
    """The folder of shipped ``methods``, ``suites``, ``reference`` numbers or ``tuning`` files."""
    return CHECKOUT / _SHIPPED[name] if CHECKOUT is not None else _PACKAGE / "shipped" / name


def kdbench_home() -> Path:
    """Local state (MLflow store, teacher checkpoints): ``$KDBENCH_HOME`` or ``./.kdbench``."""
    return Path(os.environ.get("KDBENCH_HOME", ".kdbench")).resolve()
