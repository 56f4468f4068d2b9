"""One run from spec to record: data, cached teacher, method, the training loop, measurements."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from kdbench.config import MeasureConfig, RunSpec
from kdbench.distributed import Ranks, barrier, is_main
from kdbench import deploy
from kdbench.errors import KdbenchError
from kdbench.timing_lock import exclusive_use
from kdbench.metrics import CHECK_INPUTS, calibration_for, cost_metrics, flops_per_sample, int8_accuracy, predict, top1
from kdbench.method import METHODS, Method
from kdbench.models import (
    count_params,
    create_model,
    model_device,
    pretrained_path,
    weights_digest,
)
from kdbench.predictions import split_predictions
from kdbench.records import load_record, new_record, record_path, write_record
from kdbench.sources import build_methods, distillation_source, stand_in_source
from kdbench.teachers import TeacherOutputs, cached_teacher_outputs, load_or_train_teacher, teacher_path, trained_from
from kdbench.tracking import log_run
from kdbench.tracks import TrackData, load_track, sealed
from kdbench.paths import kdbench_home
from kdbench.train import DivergedError, fit


@dataclass(frozen=True)
class Placement:
    """Where a run finds its data and where it computes; none of it changes what the run's config is."""

    data_root: Path | None = None
    download: bool = False  # fetch a dataset that is missing (only when the user asks)
    device: str = "cpu"
    ranks: Ranks | None = None  # this process's place among the processes training each run with DDP (torchrun)


@lru_cache(maxsize=4)
def _loaded(track: str, data_root: Path | None, download: bool) -> TrackData:
    return load_track(track, data_root, download)


def track_data(spec: RunSpec, place: Placement) -> TrackData:
    return _loaded(spec.track, place.data_root, place.download).limited(dict(spec.limit))


def run_one(spec: RunSpec, results_dir: Path, place: Placement = Placement(), log=None, mirror=log_run) -> dict | None:
    """Train and measure one run, write its record (also when it diverges) and mirror it (MLflow by default).
    Under DDP every process trains and the main one alone writes and mirrors; the others return None."""
    record = train_and_measure(spec, place, log)
    if record is None:
        return None
    write_record(record_path(results_dir, spec), record)
    if mirror:
        mirror(record)
    return record


@dataclass(frozen=True)
class Prepared:
    """A run ready to train: its data (one fold on a cross-validated track), teacher, what the method distils from,
    the student, the method and the teacher's cached outputs."""

    data: TrackData
    description: dict  # the track's data description (the config's ``data``)
    teacher: nn.Module
    teacher_key: str
    source: nn.Module
    about_source: dict
    student: nn.Module
    method: Method
    teacher_outputs: TeacherOutputs | None
    about_outputs: dict


def prepare(spec: RunSpec, place: Placement = Placement(), seal_test: bool = False) -> Prepared:
    """Everything a run trains with, built and seeded as every run builds it. ``seal_test``: the run's test split is
    replaced by one that refuses to be read (tuning), and nothing is measured on it."""
    world_size = place.ranks.world_size if place.ranks else 1
    if spec.world_size != world_size:
        raise KdbenchError(f"{spec.label()}: its config trains on {spec.world_size} process(es), this command runs "
                           f"{world_size}; re-run it with torchrun --nproc_per_node {spec.world_size} -m kdbench run")
    torch.set_num_threads(spec.measure.threads)
    deterministic(place.device)
    base = track_data(spec, place)
    data = base.for_seed(spec.seed)  # a cross-validated track's fold; the config names the scheme, not the fold
    if seal_test:
        data = sealed(data)
    teacher, teacher_key = load_or_train_teacher(spec.track, data, spec.teacher, spec.teacher_train, spec.teacher_seed,
                                                 place.device, place.data_root)
    source, source_key, about_source = distillation_source(spec, teacher, teacher_key, data, place.device,
                                                           place.data_root, describe=not seal_test)
    torch.manual_seed(spec.seed)
    student = create_model(spec.student, data.num_classes, data.in_shape, place.data_root).to(place.device)
    (method,) = build_methods([spec], data, student, source, _peer_maker(spec, data, place))
    method.to(place.device)
    teacher_outputs, about_outputs = (
        cached_teacher_outputs(source, method.taps(method.config)[1], data.train, source_key)
        if method.needs_teacher else (None, {"cached": False, "reason": "the method uses no teacher"}))
    return Prepared(data, base.description, teacher, teacher_key, source, about_source, student, method,
                    teacher_outputs, about_outputs)


def train_and_measure(spec: RunSpec, place: Placement = Placement(), log=None) -> dict | None:
    """One run's record (status ``failed`` when it diverges), written nowhere: the caller keeps it. Under DDP
    (``place.ranks``) every process trains, the main one alone measures (the others wait, so timings run on an
    idle machine) and returns the record; the others return None."""
    run = prepare(spec, place)
    data, student, method = run.data, run.student, run.method
    config = spec.config(run.description, pretrained_digests(spec, place))
    record = new_record(spec.suite, spec.seed, config, spec.measure.threads, place.device,
                        suite_seeds=list(spec.suite_seeds), teacher_sha256=run.teacher_key,
                        **({"ddp_backend": place.ranks.backend} if place.ranks else {}),
                        teacher_trained_from=spec.teacher_train and trained_from(
                            teacher_path(spec.track, spec.teacher, run.teacher_key)),
                        **({"source": run.about_source} if run.about_source else {}))
    record["teacher_outputs"] = run.about_outputs
    checkpoint = kdbench_home() / "checkpoints" / f"{spec.track}-{record['config_sha256'][:16]}-seed{spec.seed}.pt"
    start = time.perf_counter()
    history: list[dict] = []
    try:
        history = fit(student, method, run.source, data, spec.train, spec.seed, _progress(spec, log), checkpoint,
                      run.teacher_outputs, place.ranks)
    except DivergedError as exc:
        record.update(status="failed", error=f"diverged: {exc}", metrics=None)
    else:
        barrier(place.ranks)  # every process has finished training before the main one times the models
        if is_main(place.ranks):
            preds = {"test": predict(student, data.test), "val": predict(student, data.val)}
            metrics = run_metrics(student, method, run.teacher, data, spec.measure, time.perf_counter() - start,
                                  spec.train.epochs, preds=preds)
            predictions = {name: split_predictions(preds[name], getattr(data, name)) for name in preds}
            if spec.measure.deployment:
                int8_metrics, int8_preds = int8_accuracy(student, data, spec.measure.int8_calibration,
                                                         architecture=(spec.student, data.num_classes))
                metrics |= int8_metrics
                record["env"] |= deploy.versions()
                if int8_preds:
                    predictions["test_int8"] = split_predictions(int8_preds["test"], data.test)
            record.update(status="finished", predictions=predictions, metrics=metrics)
    barrier(place.ranks)  # the other processes start nothing new while the main one measures
    if not is_main(place.ranks):
        return None
    record["history"] = history
    checkpoint.unlink(missing_ok=True)
    return record


def validation_curve(spec: RunSpec, place: Placement = Placement(), on_epoch=None) -> list[dict]:
    """Train one run as ``train_and_measure`` does, with its test split sealed, and return its per-epoch history
    (validation top-1 after every epoch); nothing is written. Raises ``DivergedError`` when the loss diverges."""
    run = prepare(spec, place, seal_test=True)
    return fit(run.student, run.method, run.source, run.data, spec.train, spec.seed, on_epoch,
               teacher_outputs=run.teacher_outputs)


def is_finished(results_dir: Path, spec: RunSpec) -> bool:
    """Whether a finished record of this exact config (method version included) already exists."""
    path = record_path(results_dir, spec)
    if not path.exists():
        return False
    try:
        record = load_record(path)
    except KdbenchError:
        return False  # a damaged record is redone
    c = record.config
    return record.status == "finished" and c == spec.config(c.get("data", {}), c.get("pretrained"))


def pretrained_digests(spec: RunSpec, place: Placement) -> dict[str, str]:
    """sha256 of the pretrained weights the run's models start from (part of its config)."""
    paths = {name: pretrained_path(name, place.data_root) for name in (spec.teacher, spec.student)}
    return {name: weights_digest(path) for name, path in paths.items() if path is not None}


def deterministic(device: str) -> None:
    """Deterministic kernels: bit-exact on CPU; on CUDA cuBLAS needs a fixed workspace, and ops without a
    deterministic kernel warn instead of failing. Deterministic mode also fills every new tensor with NaN, a
    guard against reading uninitialised memory that no kernel here does; it is switched off, with identical
    results (its cost on the CPU tier is in README, "Performance")."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=torch.device(device).type != "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False


def preflight(specs: list[RunSpec], place: Placement = Placement()) -> None:
    """Build every run's method on untrained models, so a bad tap or shape fails before anything trains."""
    by_pair: dict[tuple, dict] = {}
    for s in specs:
        by_pair.setdefault((s.track, s.limit, s.teacher, s.student), {})[(s.method, repr(s.method_config))] = s
    for pair_specs in by_pair.values():
        spec = next(iter(pair_specs.values()))
        data = track_data(spec, place)
        pretrained_digests(spec, place)  # a missing weights file fails here, before anything trains
        student, teacher = (create_model(name, data.num_classes, data.in_shape, random_init=True)
                            for name in (spec.student, spec.teacher))
        fresh = lambda name: create_model(name or spec.teacher, data.num_classes, data.in_shape,  # noqa: E731
                                          random_init=True)
        by_source: dict[int, tuple] = {}  # most methods distil from the pair's teacher; ensembles and assistants not
        for s in pair_specs.values():
            cls = METHODS.get(s.method)
            source = stand_in_source(cls, cls.Config(**s.method_config), teacher, fresh)
            by_source.setdefault(id(source), (source, []))[1].append(s)
        for source, group in by_source.values():
            build_methods(group, data, student, source, lambda: fresh(spec.student), dry_loss=True)


def _peer_maker(spec: RunSpec, data: TrackData, place: Placement):
    """Fresh networks of the student's architecture, for methods with peers (kdbench.method: ``peer_count``)."""
    return lambda: create_model(spec.student, data.num_classes, data.in_shape, place.data_root).to(place.device)


def _progress(spec: RunSpec, log):
    if log is None:
        return None
    return lambda row: log(f"  epoch {row['epoch']}/{spec.train.epochs}  loss {row['train_loss']:.4f}  val {row['val_top1']:.1f}%")


def run_metrics(student, method, teacher, data: TrackData, measure: MeasureConfig, train_seconds: float, epochs: int,
                timed: tuple[nn.Module, nn.Module] | None = None, preds: dict | None = None) -> dict:
    """A record's metrics: accuracy and agreement on ``data.test``, sizes, and with ``timed`` (the Python API
    passes the user's models inside their adapters) the latency and throughput of those two models timed side by
    side. Benchmark runs time nothing here: each architecture is timed once, beside its teacher
    (``time_architectures``), so that identical students never show different speeds. ``preds``: the
    student's predictions on the test and validation splits when the caller already has them."""
    preds = preds or {"test": predict(student, data.test), "val": predict(student, data.val)}
    teacher_preds = predict(teacher, data.test)
    sample = data.test.sample(1)
    costs = {}
    if timed is not None:
        with exclusive_use():  # no parallel run trains while these are timed
            student_cost, teacher_cost = cost_metrics(timed, data.test.sample(CHECK_INPUTS), measure.threads,
                                                      measure.throughput_batch, measure.min_run_time,
                                                      calibration_for(data, measure))
        costs = student_cost | {f"teacher_{k}": v for k, v in teacher_cost.items() if k != "throughput_batch"}
    return {
        "test_top1": top1(preds["test"], data.test.y),
        "val_top1": top1(preds["val"], data.val.y),
        "teacher_top1": top1(teacher_preds, data.test.y),
        "agreement": top1(preds["test"], teacher_preds),
        "params": count_params(student),
        "flops": flops_per_sample(student, sample),
        "teacher_params": count_params(teacher),
        "teacher_flops": flops_per_sample(teacher, sample),
        "extra_params": count_params(method),
        "train_seconds": train_seconds,
        "epochs": epochs,
        **costs,
    }
