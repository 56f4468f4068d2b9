"""Validated configuration: the training schedule, the measurement settings, and one run's spec."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import Field

STRICT = pydantic.ConfigDict(extra="forbid", frozen=True)


SPEED_MODES = ("precision", "channels_last", "compile")  # TrainConfig's opt-ins: in a written config only when on


class TrainConfig(pydantic.BaseModel):
    """One training schedule (student or teacher)."""

    model_config = STRICT
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine", "multistep", "constant", "linear"] = "onecycle"
    milestones: tuple[int, ...] = ()
    gamma: float = Field(default=0.1, gt=0, le=1)
    # CPU threads while training: part of the config because a different count can change results in the last bit;
    # None leaves torch's default (all cores), 1 suits tiny models and lets `--workers` run one run per core
    threads: int | None = Field(default=None, gt=0)
    # opt-in speed modes (README, "Performance"): off by default, and then left out of the written config, so
    # records made before they existed keep their hashes; a run that uses one says so in its config
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: the training step's forwards under torch.autocast
    channels_last: bool = False  # models and image batches in channels-last memory format (4-D inputs only)
    # torch.compile of the training step's forwards and losses, in one of torch's modes ("reduce-overhead": CUDA
    # graphs on a GPU); the same math, rounded differently
    compile: Literal["none", "default", "reduce-overhead"] = "none"

    @pydantic.model_serializer(mode="wrap")
    def _without_defaults_of_opt_ins(self, handler):
        return _without_defaults(self, handler(self), SPEED_MODES)


def _without_defaults(model: pydantic.BaseModel, out: dict, opt_ins: tuple[str, ...]) -> dict:
    """``out`` without the opt-in fields that are at their default: configs written before those fields existed
    keep their hashes."""
    return {k: v for k, v in out.items() if k not in opt_ins or v != type(model).model_fields[k].default}


class MeasureConfig(pydantic.BaseModel):
    """How size and speed are measured: threads, the throughput batch, seconds of timed blocks per model, and
    whether models are also deployed (kdbench.deploy): exported to ONNX and timed in ONNX Runtime in fp32 and int8
    beside eager, and each trained student quantized to int8 with ``int8_calibration`` training samples and
    tested. Deployment is off by default, and its fields are then left out of the written config."""

    model_config = STRICT
    threads: int = Field(default=2, gt=0)
    throughput_batch: int = Field(default=256, gt=0)
    min_run_time: float = Field(default=0.5, gt=0)
    deployment: bool = False
    int8_calibration: int = Field(default=256, gt=0)  # a common size for static calibration; not from a paper

    @pydantic.model_serializer(mode="wrap")
    def _without_deployment_when_off(self, handler):
        out = handler(self)
        return out if self.deployment else {k: v for k, v in out.items() if k not in ("deployment", "int8_calibration")}


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: track × pair × method × seed, fully resolved."""

    suite: str
    track: str
    teacher: str
    student: str
    method: str
    method_version: int
    method_config: dict
    seed: int
    train: TrainConfig
    teacher_train: TrainConfig | None  # None: the teacher's pretrained weights are used as they are
    teacher_seed: int
    measure: MeasureConfig
    limit: tuple[tuple[str, int], ...] = ()  # smoke runs: at most this many samples per split
    world_size: int = 1  # processes training this one run with DDP (torchrun); train.batch_size is the global batch
    suite_seeds: tuple[int, ...] = ()  # every seed the suite declares for this row (not part of the config)
    tuning: dict | None = None  # a tuned run: its study, budget and the study's sha256 (kdbench.tuned)

    @property
    def pair(self) -> str:
        return f"{self.teacher}:{self.student}"

    def config(self, data_description: dict, pretrained: dict[str, str] | None = None) -> dict:
        """The resolved config written into the record; identical across seeds, so it hashes a leaderboard row.
        ``pretrained`` maps models that start from pretrained weights to those weights' sha256. A DDP run's config
        also says how its batches were split (kdbench.distributed); a single process's has no such entry."""
        distributed = {"world_size": self.world_size, "global_batch": self.train.batch_size,
                       "per_rank_batch": self.train.batch_size // self.world_size,
                       "sync_batchnorm": False}  # batch norm statistics stay per process
        return ({"pretrained": pretrained} if pretrained else {}) | (
            {"distributed": distributed} if self.world_size > 1 else {}) | (
            {"tuning": self.tuning} if self.tuning else {}) | {
            "track": self.track,
            "data": data_description,
            "teacher": self.teacher,
            "student": self.student,
            "method": self.method,
            "method_version": self.method_version,
            "method_config": self.method_config,
            "train": self.train.model_dump(mode="json"),
            "teacher_train": self.teacher_train and self.teacher_train.model_dump(mode="json"),
            "teacher_seed": self.teacher_seed,
            "measure": self.measure.model_dump(mode="json"),
        }

    @classmethod
    def from_record(cls, record) -> "RunSpec":
        """The spec that produced a record (its resolved config and seed), to re-run it."""
        c = record.config
        return cls(
            suite=record.suite,
            track=c["track"],
            teacher=c["teacher"],
            student=c["student"],
            method=c["method"],
            method_version=c["method_version"],
            method_config=c["method_config"],
            seed=record.seed,
            train=TrainConfig(**c["train"]),
            teacher_train=c["teacher_train"] and TrainConfig(**c["teacher_train"]),
            teacher_seed=c["teacher_seed"],
            measure=MeasureConfig(**c["measure"]),
            limit=tuple(sorted(c["data"].get("limit", {}).items())),
            world_size=c.get("distributed", {}).get("world_size", 1),
            suite_seeds=tuple(getattr(record, "suite_seeds", None) or ()),
            tuning=c.get("tuning"),
        )

    def label(self) -> str:
        label = f"{self.track} {self.pair} {self.method} seed {self.seed}"
        if self.tuning:
            label += f" (tuned, {self.tuning['budget']} trials)"
        if self.world_size > 1:
            label += f" (DDP on {self.world_size} processes, global batch {self.train.batch_size})"
        return label
