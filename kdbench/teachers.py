"""Teachers: trained once per (track data, architecture, schedule, seed) and cached as safetensors, keyed by
the sha256 of that config (``teacher_key``); and their outputs, computed once per (teacher checkpoint, data,
taps) and reused across methods and seeds.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kdbench import records
from kdbench.config import TrainConfig, sha256_of
from kdbench.errors import KdbenchError
from kdbench.taps import FeatureTaps
from kdbench.method import MethodConfig, SupervisedOnly
from kdbench.models import create_model, pretrained_path, weights_digest
from kdbench.paths import kdbench_home
from kdbench.tracks import Split, TrackData
from kdbench.train import fit

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


TEACHER_FORMAT = 3  # bump when teacher training code changes what it produces (2: seeded initial weights; 3: fused AdamW)


def teacher_key(track: str, data: TrackData, teacher: str, cfg: TrainConfig | None, seed: int,
                weights: Path | None = None) -> str:
    return sha256_of(
        {"track": track, "data": data.description, "teacher": teacher, "train": cfg and cfg.model_dump(mode="json"),
         "seed": seed, "format": TEACHER_FORMAT} | ({"pretrained": weights_digest(weights)} if weights else {})
    )


def load_or_train_teacher(track: str, data: TrackData, name: str, cfg: TrainConfig | None, seed: int,
                          device: torch.device | str = "cpu", data_root: Path | None = None) -> tuple[nn.Module, str]:
    """The teacher for (track, teacher config), trained once and cached as safetensors; (model, key).

    A teacher with pretrained weights starts from them (``data_root/pretrained/...``); with ``cfg`` None it is
    used as it is, without training.
    """
    weights = pretrained_path(name, data_root)
    key = teacher_key(track, data, name, cfg, seed, weights)
    torch.manual_seed(seed)  # the initial weights, too, come from the teacher's own seed
    model = create_model(name, data.num_classes, data.in_shape, data_root).to(device)
    if cfg is None:
        if weights is None:
            raise KdbenchError(f"teacher {name} has no pretrained weights: give the suite's track a teacher_train")
        return model.eval(), key
    path = teacher_path(track, name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            print(f"training teacher {name} on {track} ({cfg.epochs} epochs; cached at {path})", file=sys.stderr)
            start = time.perf_counter()
            fit(model, SupervisedOnly(MethodConfig(), {}, {}), None, data, cfg, seed)
            save_weights(model, path)
            print(f"teacher trained in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        try:
            model.load_state_dict(load_file(str(path), device=str(device)))
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is refused, never unpickled
            raise KdbenchError(f"teacher checkpoint {path} is not a safetensors weights file for {name} "
                               f"({type(exc).__name__}); delete it and the teacher is retrained") from None
    warn_if_untraceable(path, f"teacher {name}")
    return model.eval(), key


def teacher_path(track: str, name: str, key: str) -> Path:
    return kdbench_home() / "teachers" / f"{track}-{name}-{key[:16]}.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors, written atomically, with the git state of the code that trained it
    in the file's metadata (``trained_from``)."""
    commit, dirty = records.git_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"git_commit": commit or "", "git_dirty": "unknown" if dirty is None else str(dirty).lower()})
    os.replace(tmp, path)


def trained_from(path: Path) -> dict | None:
    """{"git_commit", "git_dirty"} of the code that trained a cached model; None for files from before kdbench
    wrote it (or pretrained weights)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "git_dirty" not in meta:
        return None
    return {"git_commit": meta["git_commit"] or None, "git_dirty": {"true": True, "false": False}.get(meta["git_dirty"])}


def warn_if_untraceable(path: Path, what: str) -> None:
    """One line on stderr when a cached model was trained from uncommitted code while this tree is committed: its
    key (the config's hash) cannot see code changes, so runs made with it may not reproduce from a cold cache."""
    origin = trained_from(path)
    if origin is not None and origin["git_dirty"] and records.git_state()[1] is False:
        print(f"warning: {what} at {path} was trained from a tree with uncommitted changes (on "
              f"{(origin['git_commit'] or '?')[:10]}); records made with it may not reproduce from a cold cache: "
              "delete it to retrain it from this commit", file=sys.stderr)
