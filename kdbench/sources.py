"""What a run's method distils from, and the method built for it.

Usually the pair's teacher. Two method hooks (kdbench.method) change that, with no branch on a method's name:
- ``teacher_members``: an ensemble of teachers (``TeacherEnsemble``), each trained and cached like the pair's;
- ``assistants``: a chain of models distilled in turn from the teacher (or the ensemble) by the same method and
  config, each cached like a teacher, keyed by everything it was made from; the student learns from the last.
A third hook, ``peer_count``, gives an online method networks of the student's architecture (``build_methods``).
What the record says of the source (each member's and the ensemble's test top-1; each assistant's size, accuracy
and training time) is returned beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors.torch import load_file
from torch import nn

from kdbench.config import RunSpec, sha256_of
from kdbench.errors import KdbenchError
from kdbench.method import METHODS, Method
from kdbench.metrics import predict, top1
from kdbench.models import count_params, create_model, model_device
from kdbench.paths import kdbench_home
from kdbench.records import write_atomic
from kdbench.taps import MASK, probe, tap_shapes
from kdbench.teachers import (cached_teacher_outputs, load_or_train_teacher, save_weights, teacher_path, trained_from,
                              warn_if_untraceable)
from kdbench.tracks import TrackData
from kdbench.train import fit

ASSISTANT_FORMAT = 1  # bump when assistant training changes what it produces


class TeacherEnsemble(nn.Module):
    """Several teachers as one model: ``logits`` are log of the mean of their softmax outputs (Hinton et al. 2015,
    §3: the ensemble's prediction is the arithmetic mean of its members' distributions), so its top-1 is the
    ensemble's; the tap ``member:<i>`` is member i's own logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(members)
        self.members = tuple(f"nets.{i}" for i in range(len(members)))

    def forward(self, x):
        log_probs = torch.stack([F.log_softmax(net(x), dim=1) for net in self.nets])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.nets))


def build_methods(specs: list[RunSpec], data: TrackData, student, teacher,
                  make_peer: Callable[[], nn.Module] | None = None, dry_loss: bool = False) -> list[Method]:
    """The runs' methods (all on this pair), their extra modules shaped by one dry forward pass of each model;
    ``make_peer`` builds a fresh network of the student's architecture for methods with peers (``peer_count``).
    With ``dry_loss`` each method's loss is also computed once on that pass, so a loss that fails does so now."""
    built = []
    for spec in specs:
        cls = METHODS.get(spec.method)
        config = cls.Config(**spec.method_config)
        built.append((spec, cls, config, *cls.taps(config)))
    sample = data.train.sample(2).to(model_device(student))
    student_out = probe(student, {tap for *_, taps, _ in built for tap in taps}, sample)
    teacher_out = probe(teacher, {tap for *_, taps in built for tap in taps}, sample)
    target = data.train.y[:2].to(student_out["logits"].device)

    def own(outputs: dict, taps) -> dict:  # the method's taps, and the padding mask of token models (kdbench.taps)
        return {t: outputs[t] for t in (*taps, MASK) if t in outputs}

    methods = []
    for spec, cls, config, s_taps, t_taps in built:
        method = construct(cls, config, tap_shapes(own(student_out, s_taps), len(data.train)),
                           tap_shapes(own(teacher_out, t_taps), len(data.train)), make_peer)
        if dry_loss and target.device.type != "meta":  # shape-only (meta) models cannot compute a loss
            _dry_loss(spec, method, own(student_out, s_taps), own(teacher_out, t_taps), target)
        methods.append(method)
    return methods


def construct(cls: type[Method], config, student_shapes: dict, teacher_shapes: dict,
              make_peer: Callable[[], nn.Module] | None = None) -> Method:
    """``cls(config, student_shapes, teacher_shapes)``, with ``peers`` from ``make_peer`` for online methods."""
    count = cls.peer_count(config)
    if not count:
        return cls(config, student_shapes, teacher_shapes)
    if make_peer is None:
        raise KdbenchError(f"method {cls.name} trains peers of the student; this caller builds none")
    return cls(config, student_shapes, teacher_shapes, peers=[make_peer() for _ in range(count)])


def stand_in_source(cls: type[Method], config, teacher: nn.Module,
                    make_model: Callable[[str | None], nn.Module]) -> nn.Module:
    """The structure of what ``cls`` distils from, with whatever weights ``make_model(architecture)`` gives (None:
    the pair's teacher's architecture): the teacher itself, an ensemble of members, or the last assistant. For
    building and checking a method before anything is trained (preflight, tests)."""
    members = cls.teacher_members(config)
    source = TeacherEnsemble([make_model(m.architecture) for m in members]).eval() if members else teacher
    for architecture in cls.assistants(config):
        source = make_model(architecture).eval()
    return source


def _dry_loss(spec: RunSpec, method, student_out: dict, teacher_out: dict, target) -> None:
    try:
        with torch.no_grad():
            method.loss(student_out, teacher_out if method.needs_teacher else None, target, 0.0)
    except Exception as exc:  # noqa: BLE001 - whatever the method raises is reported in one line before training
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise KdbenchError(f"method {spec.method} fails on a dry batch of {spec.track} {spec.pair}: "
                           f"{type(exc).__name__}: {first}") from None


def distillation_source(spec: RunSpec, teacher: nn.Module, teacher_key: str, data: TrackData, device: str = "cpu",
                        data_root: Path | None = None, describe: bool = True) -> tuple[nn.Module, str, dict]:
    """(the model the run's method distils from, its cache key, what the record says of it: {} for the pair's
    teacher alone). Ensemble members and assistants are trained (or loaded) and cached like teachers. Without
    ``describe`` (tuning: the test split is sealed) nothing is said of them, and nothing is measured on test."""
    cls = METHODS.get(spec.method)
    config = cls.Config(**spec.method_config)
    source, key, about = teacher, teacher_key, {}
    test_top1 = (lambda net: top1(predict(net, data.test), data.test.y)) if describe else (lambda net: None)
    members = cls.teacher_members(config)
    if members:
        nets, described = [], []
        for member in members:
            name, seed = member.architecture or spec.teacher, spec.teacher_seed + member.seed_offset
            net, member_key = load_or_train_teacher(spec.track, data, name, spec.teacher_train, seed, device,
                                                    data_root)
            nets.append(net)
            described.append({"teacher": name, "seed": seed, "key": member_key,
                              "test_top1": test_top1(net),
                              "trained_from": spec.teacher_train and trained_from(
                                  teacher_path(spec.track, name, member_key))})
        source = TeacherEnsemble(nets).eval()
        key = sha256_of({"ensemble": [m["key"] for m in described]})
        about["teacher_ensemble"] = {"members": described, "test_top1": test_top1(source)}
    for architecture in cls.assistants(config):
        source, key, described = _load_or_distill_assistant(_assistant_spec(spec, architecture), source, key, data,
                                                            device, data_root)
        about.setdefault("assistants", []).append({**described, "test_top1": test_top1(source)})
    return source, key, about if describe else {}


def _assistant_spec(spec: RunSpec, architecture: str) -> RunSpec:
    """The run that trains an assistant: the assistant as student, the track's teacher seed as seed."""
    return dataclasses.replace(spec, student=architecture, seed=spec.teacher_seed)


def _load_or_distill_assistant(spec: RunSpec, source: nn.Module, source_key: str, data: TrackData, device: str,
                               data_root: Path | None) -> tuple[nn.Module, str, dict]:
    """Assistant ``spec.student`` distilled from ``source`` by the run's method, trained once and cached."""
    key = sha256_of({"source": source_key, "assistant": spec.student, "method": spec.method,
                     "method_version": spec.method_version, "method_config": spec.method_config,
                     "train": spec.train.model_dump(mode="json"), "seed": spec.seed, "data": data.description,
                     "format": ASSISTANT_FORMAT})
    path = kdbench_home() / "assistants" / f"{spec.track}-{spec.student}-{key[:16]}.safetensors"
    about_path = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    assistant = create_model(spec.student, data.num_classes, data.in_shape, data_root).to(device)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            print(f"training assistant {spec.student} on {spec.track} from {spec.teacher} with {spec.method} "
                  f"({spec.train.epochs} epochs; cached at {path})", file=sys.stderr)
            (method,) = build_methods([spec], data, assistant, source, lambda: create_model(
                spec.student, data.num_classes, data.in_shape, data_root))
            method.to(device)
            outputs, _ = (cached_teacher_outputs(source, method.taps(method.config)[1], data.train, source_key)
                          if method.needs_teacher else (None, None))
            start = time.perf_counter()
            fit(assistant, method, source, data, spec.train, spec.seed, teacher_outputs=outputs)
            seconds = time.perf_counter() - start
            described = {"architecture": spec.student, "key": key, "params": count_params(assistant),
                         "val_top1": top1(predict(assistant, data.val), data.val.y), "train_seconds": seconds}
            write_atomic(about_path, json.dumps(described, indent=1))
            save_weights(assistant, path)
            print(f"assistant trained in {seconds:.1f}s", file=sys.stderr)
        try:
            assistant.load_state_dict(load_file(str(path), device=str(device)))
            described = json.loads(about_path.read_text())
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is refused, never unpickled
            raise KdbenchError(f"assistant checkpoint {path} (or its .json) is damaged ({type(exc).__name__}); "
                               "delete both and the assistant is retrained") from None
    warn_if_untraceable(path, f"assistant {spec.student}")
    return assistant.eval(), key, described | {"trained_from": trained_from(path)}

