"""The one generic training loop (students, teachers and the methods' own modules alike)."""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdbench.config import TrainConfig
from kdbench.distributed import Ranks, data_parallel, is_main, mean_over_ranks, per_rank_batch, shard
from kdbench.errors import KdbenchError
from kdbench.losses import summed
from kdbench.taps import INDEX, FeatureTaps
from kdbench.timing_lock import training_share
from kdbench.metrics import predict, top1
from kdbench.method import Method
from kdbench.models import model_device
from kdbench.tracks import TrackData

if TYPE_CHECKING:
    from kdbench.teachers import TeacherOutputs

class DivergedError(KdbenchError):
    """The loss became NaN or infinite."""


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD as configured, or AdamW in torch's fused implementation on CPU and CUDA: one kernel for all parameters
    instead of a handful of small ops per tensor (README, "Performance", has the measured step times); the same
    update, rounded differently (TEACHER_FORMAT 3)."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped once per batch. ``multistep`` milestones are in epochs, as in the CRD protocol; ``linear`` decays
    to 0 over training without warm-up (Hugging Face's default ``get_linear_schedule_with_warmup``, 0 warm-up steps)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    if cfg.schedule == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch in channels-last memory format (``TrainConfig.channels_last``)."""
    if x.dim() != 4:
        raise KdbenchError(f"channels_last needs image batches (N, C, H, W); this track's batches have shape "
                           f"{tuple(x.shape)}: set channels_last: false")
    return x.contiguous(memory_format=torch.channels_last)


def _compiler(mode: str) -> Callable:
    """``TrainConfig.compile``: ``torch.compile`` in that mode, from a clean slate (code compiled for an earlier
    run in this process is dropped, so a run compiles the same way alone or after others); "none": unchanged."""
    if mode == "none":
        return lambda step: step
    torch.compiler.reset()
    return lambda step: torch.compile(step, mode=mode)


def _detached(taps: dict | None) -> dict | None:
    return None if taps is None else {k: v.detach() for k, v in taps.items()}


def _step(optimizer: torch.optim.Optimizer, terms: dict[str, torch.Tensor], where: str,
          ranks: Ranks | None = None) -> float:
    """Sum the terms, refuse a NaN or infinite total (on any process: all of them stop at the same step), take
    one optimizer step; the total's value (averaged over processes)."""
    loss = summed(terms.values())
    value = mean_over_ranks(ranks, {"loss": loss.item()})["loss"]
    if not math.isfinite(value):
        raise DivergedError(f"{where} is {value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


class _StudentStep(nn.Module):
    """The student's forward and the method's loss as one module, so that DDP averages the gradients of the
    student and of the method's own modules alike."""

    def __init__(self, student_tapper: FeatureTaps, method: Method):
        super().__init__()
        self.student, self.method, self.tapper = student_tapper.model, method, student_tapper

    def forward(self, x, teacher_out, target, progress, index=None):
        student_out = self.tapper(x, index)
        return student_out, self.method.loss(student_out, teacher_out, target, progress)


class _AdversaryStep(nn.Module):
    """The method's adversary and its loss as one module, for the adversary's own DDP wrapper."""

    def __init__(self, method: Method):
        super().__init__()
        self.adversary, self.adversary_loss = method.adversary, method.adversary_loss

    def forward(self, student_out, teacher_out, target):
        return self.adversary_loss(student_out, teacher_out, target)


def fit(
    student: nn.Module,
    method: Method,
    teacher: nn.Module | None,
    data: TrackData,
    cfg: TrainConfig,
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    teacher_outputs: TeacherOutputs | None = None,
    ranks: Ranks | None = None,
) -> list[dict]:
    """Train ``student`` (and the method's extra modules) on ``data.train``; returns per-epoch history.

    The teacher stays in eval mode without gradients. The loop never asks which method it runs.
    With ``checkpoint``, the full training state is saved after every epoch and a run that finds one
    resumes from it, ending with the same weights as an uninterrupted run. With ``teacher_outputs`` (an
    un-augmented split) the teacher is not run: each batch reads its rows of the cached outputs.

    With ``ranks`` (kdbench.distributed; never read from the environment here, since teachers train with this
    loop too) this process is one of several training one model with DDP: ``cfg.batch_size`` is the global
    batch, every process draws the same shuffled, augmented global batches and trains on its contiguous shard,
    the gradients of the student and of the method's modules (and, separately, of its adversary) are averaged,
    and the history holds the losses averaged over processes. Batch norm statistics stay per process (see
    kdbench.distributed), as does any randomness inside the models (each process draws from the same seed).
    Only the main process writes the checkpoint; every process resumes from it.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    device = model_device(student)
    n = len(data.train)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise KdbenchError(f"batch_size {cfg.batch_size} exceeds the {n} training samples; lower batch_size")
    if ranks is not None:
        per_rank_batch(cfg.batch_size, ranks.world_size)
    total_steps = cfg.epochs * steps_per_epoch
    student_taps, teacher_taps = method.taps(method.config)
    student_tapper = FeatureTaps(student, student_taps)
    wants_index = INDEX in student_taps
    if wants_index and not hasattr(data.train, "indexed_batches"):
        raise KdbenchError(f"method {method.name} reads each sample's index (the 'index' tap), which a DataLoader's "
                           "batches do not give; pass the training data as tensors (X, y)")
    teacher_tapper = FeatureTaps(teacher, teacher_taps) if method.needs_teacher and teacher_outputs is None else None
    optimizer = make_optimizer(list(student.parameters()) + method.student_side_parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    adversary = getattr(method, "adversary", None)
    adversary_optimizer = method.adversary_optimizer(adversary.parameters()) if adversary is not None else None
    student_step = _StudentStep(student_tapper, method)
    adversary_step = _AdversaryStep(method) if adversary is not None else None
    if ranks is not None:  # the adversary is trained by its own step: the student step's DDP leaves it alone
        own = chain(adversary.named_parameters(), adversary.named_buffers()) if adversary is not None else ()
        student_step = data_parallel(student_step, ranks, ignore=[f"method.adversary.{name}" for name, _ in own])
        adversary_step = adversary_step and data_parallel(adversary_step, ranks)
    compiled = _compiler(cfg.compile)  # after DDP's wrapping, as torch's DDP documentation asks
    student_step = compiled(student_step)
    adversary_step = adversary_step and compiled(adversary_step)
    teacher_forward = teacher_tapper and compiled(teacher_tapper.__call__)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if cfg.channels_last:  # 4-D weights only; the others are left as they are
        for module in (student, teacher, method):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    # bf16: every forward of the step (teacher, student, the method's modules and loss) under autocast; weights,
    # gradients and optimizer state stay fp32, and so do the evaluations
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    student.train()
    method.train()
    stateful = {"student": student, "method": method, "optimizer": optimizer, "scheduler": scheduler}
    if adversary_optimizer is not None:
        stateful["adversary_optimizer"] = adversary_optimizer
    history = _resume(checkpoint, stateful, order) if checkpoint is not None and checkpoint.exists() else []
    try:
        for epoch in range(len(history), cfg.epochs):
            sums: dict[str, float] = defaultdict(float)
            with training_share():  # a parallel run's timing waits for the end of this epoch
                if teacher_outputs is None and not wants_index:
                    batches = ((None, x, y) for x, y in data.train.batches(cfg.batch_size, order, train=True))
                else:
                    batches = data.train.indexed_batches(cfg.batch_size, order, train=True)
                for i, batch in enumerate(batches):
                    idx, x, y = shard(ranks, *batch)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if cfg.channels_last:
                        x = _channels_last(x)
                    step = epoch * steps_per_epoch + i
                    progress = step / total_steps
                    if teacher_outputs is not None:
                        t_out = teacher_outputs.rows(idx, device)
                    else:
                        with torch.no_grad(), autocast:
                            t_out = teacher_forward(x) if teacher_forward else None
                    index = idx.to(device, non_blocking=True) if wants_index else None
                    with autocast:
                        s_out, terms = student_step(x, t_out, y, progress, index)
                    loss = _step(optimizer, terms, f"loss at epoch {epoch + 1}, step {step}", ranks)
                    scheduler.step()
                    if adversary_step is not None:
                        with autocast:
                            adv_terms = adversary_step(_detached(s_out), _detached(t_out), y)
                        _step(adversary_optimizer, adv_terms, f"adversary loss at epoch {epoch + 1}, step {step}",
                              ranks)
                        terms = {**terms, **{f"adversary_{k}": v for k, v in adv_terms.items()}}
                    method.on_step_end(progress)
                    for k, v in terms.items():
                        sums[k] += v.item()
                    sums["loss"] += loss
            sums = mean_over_ranks(ranks, sums)
            row = {"epoch": epoch + 1, **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()}}
            row["val_top1"] = top1(predict(student, data.val), data.val.y)
            history.append(row)
            if checkpoint is not None and is_main(ranks):
                _save_checkpoint(checkpoint, stateful, order, history)
            if on_epoch:
                on_epoch(row)
    finally:
        student_tapper.remove()
        if teacher_tapper:
            teacher_tapper.remove()
    return history


def _save_checkpoint(path: Path, stateful: dict, order: torch.Generator, history: list[dict]) -> None:
    """Model, method, optimizer and scheduler states, RNG states and history; written atomically."""
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state.update(rng=torch.get_rng_state(), order=order.get_state(), history=history)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, stateful: dict, order: torch.Generator) -> list[dict]:
    """Restore what ``_save_checkpoint`` wrote (plain tensors and numbers only: ``weights_only=True``)."""
    try:
        state = torch.load(path, weights_only=True, map_location=model_device(stateful["student"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is refused the same way
        raise KdbenchError(f"checkpoint {path} is not a plain training-state file ({type(exc).__name__}); "
                           "delete it to restart the run") from None
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])
    order.set_state(state["order"])
    print(f"resumed from {path} after epoch {len(state['history'])}", file=sys.stderr)
    return state["history"]
