"""Teacher outputs computed once per (teacher checkpoint, data, taps) and reused across methods and seeds.

The teacher is frozen and in eval mode, so on a training split without random augmentation its outputs for a
sample never change: they are computed once, in order, and each training batch reads its rows. They are kept
in memory and in ``$KDBENCH_HOME/teacher_outputs/`` (safetensors), keyed by the sha256 of the teacher's key
(track, data description, teacher config and weights) and the taps. With random augmentation the outputs
depend on each draw, so caching is off and the record says why — never silently wrong. Features are cached
only when everything fits ``KDBENCH_TEACHER_CACHE_MB`` (default 2048); ``KDBENCH_TEACHER_CACHE=0`` switches
caching off (the benchmarks compare both paths).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from kdbench.config import sha256_of
from kdbench.features import FeatureTaps
from kdbench.tracks import Split
from kdbench.paths import kdbench_home

CACHE_FORMAT = 1
DEFAULT_BUDGET_MB = 2048
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}  # the last few caches of this process


@dataclass(frozen=True)
class TeacherOutputs:
    outputs: dict[str, torch.Tensor]  # tap -> one row per training sample, in the split's order
    key: str

    def rows(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {tap: value[index].to(device, non_blocking=True) for tap, value in self.outputs.items()}


def budget_bytes() -> int:
    return int(float(os.environ.get("KDBENCH_TEACHER_CACHE_MB", DEFAULT_BUDGET_MB)) * 2**20)


def cached_teacher_outputs(teacher: torch.nn.Module, taps: tuple[str, ...], split: Split, teacher_key: str
                           ) -> tuple[TeacherOutputs | None, dict]:
    """The teacher's outputs on every training sample (or None) and what the run record says about it."""
    if os.environ.get("KDBENCH_TEACHER_CACHE", "1") == "0":
        return None, {"cached": False, "reason": "switched off (KDBENCH_TEACHER_CACHE=0)"}
    if not isinstance(split, Split) or split.augment is not None:
        return None, {"cached": False, "reason": "random augmentation: teacher outputs change with every draw"}
    key = sha256_of({"teacher": teacher_key, "taps": sorted(taps), "samples": len(split), "format": CACHE_FORMAT})
    info = {"cached": True, "key": key}
    if key in _MEMORY:
        return TeacherOutputs(_MEMORY[key], key), info
    path = kdbench_home() / "teacher_outputs" / f"{key[:32]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            outputs = load_file(str(path))
        else:
            outputs = _compute(teacher, taps, split)
            if outputs is None:
                return None, {"cached": False, "reason": f"teacher outputs exceed KDBENCH_TEACHER_CACHE_MB "
                                                         f"({budget_bytes() // 2**20})"}
            tmp = path.with_suffix(".tmp")
            save_file(outputs, str(tmp))
            os.replace(tmp, path)
    _MEMORY.clear()  # one track's outputs at a time: a suite runs its runs track by track
    _MEMORY[key] = outputs
    return TeacherOutputs(outputs, key), info


@torch.no_grad()
def _compute(teacher: torch.nn.Module, taps: tuple[str, ...], split: Split) -> dict[str, torch.Tensor] | None:
    """Every tap on every sample, in order (eval mode, as in training); None when it would exceed the budget."""
    device = next(teacher.parameters()).device
    tapper = FeatureTaps(teacher, taps)
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for x, _ in split.batches(split.eval_batch):
            out = tapper(x.to(device))
            if not chunks:
                per_sample = sum(v[0].numel() * v.element_size() for v in out.values())
                if per_sample * len(split) > budget_bytes():
                    return None
            for tap, value in out.items():
                chunks.setdefault(tap, []).append(value.detach().cpu())
    finally:
        tapper.remove()
    return {tap: torch.cat(values).contiguous() for tap, values in chunks.items()}
