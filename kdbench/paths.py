"""Where kdbench keeps local state: ``$KDBENCH_HOME`` (default ``./.kdbench``), a leaf module without torch.

Under it: ``mlflow.db`` and ``mlartifacts/`` (the local MLflow store), ``teachers/`` (trained teachers),
``teacher_outputs/`` (their cached outputs), ``checkpoints/`` (training state of unfinished runs),
``datasets/`` (the Hugging Face datasets cache) and ``machine.lock`` (timings take the machine to themselves).
"""

from __future__ import annotations

import os
from pathlib import Path


def kdbench_home() -> Path:
    """Local state (MLflow store, teacher checkpoints): ``$KDBENCH_HOME`` or ``./.kdbench``."""
    return Path(os.environ.get("KDBENCH_HOME", ".kdbench")).resolve()
