"""The Python API: distill, evaluate and measure a user's own torch models (timm and transformers included).

``distill`` runs the benchmark's own pieces on the user's pair: the method from the registry, its config
validated, taps resolved on the user's modules, the one training loop (``kdbench.train.fit``), the same
measurements, and an MLflow run shaped like a benchmark run's (suite ``api``, track ``custom``).

Models are read through a thin adapter: a forward that returns a Hugging Face ``ModelOutput`` is read through
its ``.logits``, and stages (for taps ``stage:<i>``) are the dotted module names the user gives, or the model's
own ``stages``. The user's models are never edited: no attribute is set on them; the teacher gets back its
training mode and ``requires_grad`` flags after the call. The student is trained in place and returned in eval
mode.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from contextlib import contextmanager

import pydantic
import torch
from safetensors.torch import save_model
from torch import nn

from kdbench import deploy
from kdbench.config import MeasureConfig, TrainConfig
from kdbench.errors import KdbenchError
from kdbench.taps import probe_shapes
from kdbench.metrics import cost_metrics, int8_accuracy, predict, top1
from kdbench.method import METHODS, Method, format_validation_error, validate_config
from kdbench.records import Record, new_record
from kdbench.runner import deterministic, run_metrics
from kdbench.tracking import log_run
from kdbench.tracks import TrackData
from kdbench.tracks.custom import LoaderSplit, as_split, hold_out
from kdbench.train import DivergedError, fit

DEFAULT_BATCH = 64  # for (X, y) tensors, at most the training set; a DataLoader batches by itself


# DistillReport's fields that come from a record's metrics, and their names there.
_REPORT_FIELDS = {
    "student_top1": "test_top1", "teacher_top1": "teacher_top1", "agreement": "agreement",
    "student_params": "params", "teacher_params": "teacher_params", "extra_params": "extra_params",
    "student_flops": "flops", "teacher_flops": "teacher_flops", "student_latency_ms": "latency_b1_ms",
    "teacher_latency_ms": "teacher_latency_b1_ms", "student_throughput": "throughput_bN",
    "teacher_throughput": "teacher_throughput_bN", "throughput_batch": "throughput_batch",
    "train_seconds": "train_seconds",
}


@dataclasses.dataclass(frozen=True)
class DistillReport:
    """What ``distill`` measured, on the test split when ``test_data`` was given, else on the validation split."""

    method: str
    split: str  # "test" or "validation": where accuracy, agreement, FLOPs and latency were measured
    student_top1: float  # percent
    teacher_top1: float
    agreement: float  # percent of samples where student and teacher predict the same class
    student_params: int
    teacher_params: int
    extra_params: int  # the method's own trainable modules (a regressor, ...), never part of the student
    student_flops: int  # forward FLOPs per sample
    teacher_flops: int
    student_latency_ms: float  # batch 1, median
    teacher_latency_ms: float
    student_throughput: float  # samples/s at batch ``throughput_batch``
    teacher_throughput: float
    throughput_batch: int
    train_seconds: float
    history: list[dict]  # per epoch: training loss terms and validation top-1
    logged: bool  # whether the run reached MLflow
    # deployment (on unless ``timing={"deployment": False}``; kdbench.deploy): None where it was off or failed
    student_onnx_latency_ms: float | None = None  # batch 1, median, ONNX Runtime fp32, timed beside eager
    teacher_onnx_latency_ms: float | None = None
    student_int8_latency_ms: float | None = None  # ONNX Runtime, after int8 static quantization
    student_int8_top1: float | None = None  # percent, on the report's split, after int8 quantization
    int8_weight_bits: int | None = None  # 7 where this CPU's int8 kernels would clip 8-bit weights (kdbench.deploy)
    deployment_error: str | None = None  # why the student could not be exported or quantized
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # ``export=``: "safetensors", "onnx" → path

    @classmethod
    def from_metrics(cls, method: str, split: str, metrics: dict, history: list[dict], logged: bool,
                     files: dict[str, str] | None = None) -> DistillReport:
        """From the metrics of a run record (``_metrics``)."""
        latency = lambda key: metrics.get(key, {}).get("latency_b1_ms")  # noqa: E731
        errors = [metrics.get(k, {}).get("error") for k in ("onnxruntime", "onnxruntime_int8")]
        return cls(method=method, split=split, history=history, logged=logged, files=files or {},
                   student_onnx_latency_ms=latency("onnxruntime"), teacher_onnx_latency_ms=latency("teacher_onnxruntime"),
                   student_int8_latency_ms=latency("onnxruntime_int8"),
                   student_int8_top1=metrics.get("int8_test_top1"),
                   int8_weight_bits=deploy.int8_weight_bits() if "int8_test_top1" in metrics else None,
                   deployment_error=metrics.get("deployment_error") or next((e for e in errors if e), None),
                   **{field: metrics[key] for field, key in _REPORT_FIELDS.items()})

    def summary(self) -> str:
        """One line: the student against its teacher, in accuracy, size and latency."""
        retained = 100 * self.student_top1 / self.teacher_top1 if self.teacher_top1 else float("nan")
        return (f"student {self.student_top1:.1f} % vs teacher {self.teacher_top1:.1f} % top-1 on the {self.split} "
                f"split: retains {retained:.1f} % of the teacher's accuracy at "
                f"{_times(self.teacher_params / self.student_params, 'fewer parameters', 'more parameters')} and "
                f"{_times(self.teacher_latency_ms / self.student_latency_ms, 'lower latency', 'higher latency')}"
                + (f" ({_times(self.teacher_onnx_latency_ms / self.student_onnx_latency_ms, 'lower', 'higher')} in "
                   "ONNX Runtime)" if self.student_onnx_latency_ms and self.teacher_onnx_latency_ms else "")
                + (f"; {self.student_int8_top1:.1f} % top-1 after int8 quantization"
                   + (" (7-bit weights: this CPU's int8 kernels would clip 8-bit ones)"
                      if self.int8_weight_bits == 7 else "")
                   if self.student_int8_top1 is not None else ""))


def _times(ratio: float, smaller: str, larger: str) -> str:
    return f"{ratio:.1f}× {smaller}" if ratio >= 1 else f"{1 / ratio:.1f}× {larger}"


def distill(teacher: nn.Module, student: nn.Module, data, method: str = "vanilla_kd", *, epochs: int = 10,
            batch_size: int | None = None, lr: float = 1e-3, optimizer: str = "adamw", schedule: str = "onecycle",
            weight_decay: float = 0.0, seed: int = 0, device: str = "cpu", precision: str = "fp32",
            channels_last: bool = False, compile: str = "none", val_data=None, test_data=None,
            student_stages: Sequence[str] | None = None, teacher_stages: Sequence[str] | None = None,
            timing: dict | None = None, export: str | Path | None = None, log: bool = True,
            **hyperparameters) -> tuple[nn.Module, DistillReport]:
    """Train ``student`` from ``teacher`` with a registered method; returns (the trained student, its report).

    ``data``, ``val_data``, ``test_data``: ``(X, y)`` tensors or DataLoaders (``kdbench.tracks.custom``).
    Without ``val_data`` a fixed, stratified 10 % of ``data`` is held out; without ``test_data`` the report is
    measured on the validation split. ``hyperparameters`` go to the method's config (``kdbench list methods``);
    ``student_stages``/``teacher_stages`` are dotted module names for the taps ``stage:<i>``; ``timing``
    overrides the measurement settings (``threads``, ``throughput_batch``, ``min_run_time``, ``deployment``: on
    by default, both models are also timed in ONNX Runtime and the student is tested after int8 quantization,
    ``int8_calibration``: its calibration samples). ``export``: a folder where the trained student is written as
    ``student.safetensors`` and ``student.onnx``. ``precision="bf16"``, ``channels_last`` and ``compile``
    ("default" or "reduce-overhead", ``torch.compile``'s modes) are the opt-in speed modes (README,
    "Performance"). The run is logged to MLflow unless ``log=False``.
    """
    cls = METHODS.get(method)
    config = validate_config(cls, hyperparameters)
    if cls.assistants.__func__ is not Method.assistants.__func__ or cls.teacher_members(config):
        raise KdbenchError(f"{method} trains its own assistants or teacher ensemble from a suite's track; run it "
                           "with `kdbench run` (the suite names them per pair)")
    dev = _device(device)
    dtype = next(student.parameters()).dtype
    train = as_split(data, "data", dtype)
    description = {"kind": "DataLoader" if isinstance(train, LoaderSplit) else "tensors"}
    if val_data is None:
        train, val, description["validation"] = hold_out(train)
    else:
        val = as_split(val_data, "val_data", dtype)
    train_cfg = _validated(TrainConfig, "training settings", epochs=epochs, batch_size=_batch_size(train, batch_size),
                           lr=lr, optimizer=optimizer, schedule=schedule, weight_decay=weight_decay,
                           precision=precision, channels_last=channels_last, compile=compile)
    measure_cfg = _validated(MeasureConfig, "timing", **({"deployment": True} | (timing or {})))
    test = val if test_data is None else as_split(test_data, "test_data", dtype)
    description |= {"train": len(train), "val": len(val), "report_split": "validation" if test_data is None else "test"}
    s_model, t_model = _Adapted(student, student_stages, "student"), _Adapted(teacher, teacher_stages, "teacher")
    s_taps, t_taps = cls.taps(config)
    s_model.require_stages(s_taps, method)
    t_model.require_stages(t_taps if cls.needs_teacher else (), method)
    student.to(dev)
    teacher.to(dev)
    with _borrowed(teacher, device):
        sample = train.sample(2).to(dev)
        s_shapes = probe_shapes(s_model, s_taps, sample, len(train))
        t_shapes = probe_shapes(t_model, t_taps if cls.needs_teacher else (), sample)
        _check_classes(s_shapes["logits"], t_shapes["logits"], val.y)
        torch.manual_seed(seed)  # the method's own modules start from the run's seed
        peers = [_fresh_copy(s_model) for _ in range(cls.peer_count(config))]
        built = cls(config, s_shapes, t_shapes, **({"peers": peers} if peers else {})).to(dev)
        track = TrackData(train, val, test, num_classes=s_shapes["logits"][0], in_shape=tuple(sample.shape[1:]),
                          description=description)
        run_config = {
            "track": "custom", "data": description, "teacher": type(teacher).__name__,
            "student": type(student).__name__, "method": method, "method_version": cls.version,
            "method_config": config.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
            "measure": measure_cfg.model_dump(mode="json"),
            "stages": {"student": list(s_model.given), "teacher": list(t_model.given)},
        }
        start = time.perf_counter()
        try:
            history = fit(s_model, built, t_model, track, train_cfg, seed)
        except DivergedError as exc:
            if log:
                log_run(_record(run_config, seed, device, measure_cfg, "failed", None, [], f"diverged: {exc}"))
            raise
        metrics = run_metrics(s_model, built, t_model, track, measure_cfg, time.perf_counter() - start, epochs,
                              timed=(s_model, t_model))
        if measure_cfg.deployment:
            metrics |= int8_accuracy(s_model, track, measure_cfg.int8_calibration)[0]
        files = _export(s_model, student, track.test.sample(2), Path(export)) if export is not None else {}
    logged = log and log_run(_record(run_config, seed, device, measure_cfg, "finished", metrics, history))
    return student.eval(), DistillReport.from_metrics(method, description["report_split"], metrics, history, logged,
                                                      files)


def _export(adapted: nn.Module, student: nn.Module, sample: torch.Tensor, folder: Path) -> dict[str, str]:
    """Write the student's weights (safetensors) and its ONNX export (the adapter: its output is the logits) into
    ``folder``; returns the paths written. A student that does not export keeps its weights, and a warning says
    why."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"safetensors": str(folder / "student.safetensors")}
    save_model(student, files["safetensors"])
    try:
        (folder / "student.onnx").write_bytes(deploy.export(adapted, sample))
        files["onnx"] = str(folder / "student.onnx")
    except deploy.NotDeployable as exc:
        warnings.warn(f"the student's weights are in {files['safetensors']}; no ONNX file: {exc}", stacklevel=3)
    return files


def evaluate(model: nn.Module, data, teacher: nn.Module | None = None) -> float | tuple[float, float]:
    """Top-1 accuracy (%) of ``model`` on ``data`` (``(X, y)`` tensors or a DataLoader), in eval mode; with
    ``teacher``, (top-1, agreement): agreement is the percent of samples where both predict the same class."""
    split = as_split(data, "data", next(model.parameters()).dtype)
    preds = predict(_Adapted(model), split)
    if teacher is None:
        return top1(preds, split.y)
    return top1(preds, split.y), top1(preds, predict(_Adapted(teacher), split))


def measure(model: nn.Module, sample: torch.Tensor, **timing) -> dict:
    """Size and speed of ``model`` on its device: params, FLOPs per sample, batch-1 latency (median and IQR, ms)
    and throughput (samples/s at ``throughput_batch``) in eager PyTorch and, timed in the same rounds, in ONNX
    Runtime in fp32 (``onnxruntime``: its timings and largest difference from eager) and after int8 static
    quantization calibrated on ``sample`` (``onnxruntime_int8``; latency, not accuracy: calibrate on real data
    with ``distill``), or the ``error`` that kept the model out. ``sample``: real inputs with a batch dimension
    (the first is timed, all check the export); ``timing``: ``threads`` (2), ``throughput_batch`` (256),
    ``min_run_time`` (0.5 s), ``deployment`` (True)."""
    cfg = _validated(MeasureConfig, "timing", **({"deployment": True} | timing))
    x = torch.as_tensor(sample)
    x = x.to(next(model.parameters()).dtype) if x.is_floating_point() else x
    return cost_metrics([model], x, cfg.threads, cfg.throughput_batch, cfg.min_run_time,
                        x if cfg.deployment else None)[0]


def _fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer's parameters drawn anew (``reset_parameters``): an online method's peer."""
    copy = deepcopy(model)
    for module in copy.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copy


class _Adapted(nn.Module):
    """A user's model in kdbench's model contract: forward returns logits, ``stages`` lists dotted module names."""

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None, who: str = "model"):
        super().__init__()
        self.model = model
        self.who = who
        self.given = tuple(stages or ())
        for name in self.given:
            _check_module(model, name, who)
        own = self.given if stages is not None else tuple(getattr(model, "stages", ()))
        self.stages = tuple(f"model.{name}" for name in own)
        self.attentions = tuple(f"model.{name}" for name in getattr(model, "attentions", ()))
        if hasattr(model, "token_mask"):
            self.token_mask = model.token_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise KdbenchError(f"the {self.who} ({type(self.model).__name__}) returns {type(out).__name__}: "
                               "its forward must return logits (batch, classes) or an output with .logits")
        return logits

    def require_stages(self, taps, method: str) -> None:
        """A method that reads ``stage:<i>`` needs stages: name them when the model does not list its own."""
        wanted = [t for t in taps if t.startswith("stage:")]
        if wanted and not self.stages:
            children = ", ".join(name for name, _ in self.model.named_children())
            raise KdbenchError(f"method {method} reads {wanted[0]} of the {self.who}: pass {self.who}_stages="
                               f"[dotted module names] (its top-level modules: {children or 'none'})")


def _check_module(model: nn.Module, name: str, who: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = "close names" if close else "top-level modules"
        listed = close or [n for n in names if "." not in n]
        raise KdbenchError(f"{who}_stages: {type(model).__name__} has no module {name!r}; {hint}: {', '.join(listed)}")


def _check_classes(student_logits: tuple, teacher_logits: tuple, labels: torch.Tensor) -> None:
    if student_logits != teacher_logits:
        raise KdbenchError(f"the student's logits have shape {student_logits} and the teacher's {teacher_logits}: "
                           "both must score the same classes")
    if len(student_logits) != 1 or int(labels.max()) >= student_logits[0]:
        raise KdbenchError(f"labels go up to {int(labels.max())} but the models' logits have shape {student_logits}; "
                           "expected (batch, classes) with classes > every label")


def _device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise KdbenchError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, …)") from None


def _batch_size(train, batch_size: int | None) -> int:
    """The given one; by default ``DEFAULT_BATCH`` (at most the training set) for tensors, a DataLoader's own."""
    if not isinstance(train, LoaderSplit):
        return min(DEFAULT_BATCH, len(train)) if batch_size is None else batch_size
    if batch_size not in (None, train.loader.batch_size):
        raise KdbenchError(f"batch_size {batch_size}: the DataLoader batches by itself (batch size "
                           f"{train.loader.batch_size}); leave batch_size out")
    return train.loader.batch_size


def _validated(model: type[pydantic.BaseModel], what: str, **values):
    try:
        return model(**values)
    except pydantic.ValidationError as exc:
        raise KdbenchError(f"{what}: {format_validation_error(exc)}") from None


@contextmanager
def _borrowed(teacher: nn.Module, device: str):
    """Deterministic kernels as in benchmark runs; afterwards the previous setting and the teacher's training
    mode and ``requires_grad`` flags come back."""
    grads = [p.requires_grad for p in teacher.parameters()]
    mode = teacher.training
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    deterministic(device)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        teacher.train(mode)
        for p, flag in zip(teacher.parameters(), grads):
            p.requires_grad_(flag)


def _record(config: dict, seed: int, device: str, measure: MeasureConfig, status: str, metrics: dict | None,
            history: list[dict], error: str | None = None) -> dict:
    """A run record shaped like a benchmark run's (``kdbench.records.Record``), for the MLflow mirror."""
    record = new_record("api", seed, config, measure.threads, device, status=status, error=error, metrics=metrics,
                        history=history)
    Record.model_validate(record)
    return record
