"""Equal-budget tuning, the part a suite reads: its ``tune`` section (the budget, the tuning seeds, the training
hyperparameters every method searches) and the tuning file ``kdbench tune`` writes (``benchmarks/tuning/``):
per track, pair and method the chosen values, the study, its best validation mean and interval, the budget, the
study's sha256, and the hash of what was tuned, so that settings gone stale are found, not used silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
from optuna.distributions import FloatDistribution
from pydantic import Field, PositiveInt

from kdbench.config import STRICT, TrainConfig, sha256_of
from kdbench.errors import KdbenchError
from kdbench.paths import shipped

TUNING_FORMAT = 1


class FloatRange(pydantic.BaseModel):
    """One searched training hyperparameter: ``low`` to ``high``, log-uniform when ``log``."""

    model_config = STRICT
    low: float = Field(gt=0)
    high: float = Field(gt=0)
    log: bool = True

    @pydantic.model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def distribution(self) -> FloatDistribution:
        return FloatDistribution(self.low, self.high, log=self.log)


class TuneSpec(pydantic.BaseModel):
    """A suite's tuning rule: every method, baseline included, gets ``trials`` trials; each trial trains on the
    tuning seeds of its track (disjoint from the reported seeds) and is scored on the validation split only."""

    model_config = STRICT
    trials: PositiveInt
    file: str  # a name: benchmarks/tuning/<file>.json; a path ending in .json: relative to the suite file
    seeds: dict[str, tuple[int, ...]] = Field(min_length=1)  # per track
    train_space: dict[str, FloatRange] = {}  # TrainConfig fields searched by every method alike

    @pydantic.field_validator("train_space")
    @classmethod
    def _train_fields(cls, space):
        floats = [k for k, f in TrainConfig.model_fields.items() if f.annotation is float]
        for key in space:
            if key not in floats:
                raise ValueError(f"train_space: {key!r} is not a searchable training hyperparameter (one of "
                                 f"{', '.join(floats)})")
        return space


class TunedValues(pydantic.BaseModel):
    model_config = STRICT
    method: dict[str, float | int | str | bool] = {}
    train: dict[str, float] = {}


class TuningEntry(pydantic.BaseModel):
    """The outcome of one study: what a tuned run uses, and what it was chosen from."""

    model_config = STRICT
    track: str
    pair: str
    method: str
    values: TunedValues
    study: str
    budget: int
    trials: int  # the trials counted (the budget's first finished ones); pruned ones included
    seeds: tuple[int, ...]
    best_val_top1: float
    interval: tuple[float, float]  # 95 % t-interval of the chosen trial's validation top-1 over the tuning seeds
    study_sha256: str  # of the counted trials' numbers, states, parameters and values
    tuned_sha256: str  # of what was tuned (kdbench.tuned.tuned_sha256); a mismatch makes the entry stale
    code_version: str | None

    def applied(self) -> dict:
        """What a tuned run's config says of its tuning."""
        return {"study": self.study, "budget": self.budget, "study_sha256": self.study_sha256}


class TuningFile(pydantic.BaseModel):
    model_config = STRICT
    format: int = TUNING_FORMAT
    suite: str
    entries: tuple[TuningEntry, ...] = ()


def with_train_values(train: TrainConfig, values: dict[str, float]) -> TrainConfig:
    """``train`` with tuned (or trial) values of its searched fields, validated like any training config."""
    return TrainConfig(**{**train.model_dump(), **values}) if values else train


def tuning_path(spec: TuneSpec) -> Path:
    """The suite's tuning file (``load_suite`` has made a path in the suite's own folder absolute)."""
    return Path(spec.file) if spec.file.endswith(".json") else shipped("tuning") / f"{spec.file}.json"


def load_tuning(path: Path, suite: str) -> dict[tuple[str, str, str], TuningEntry]:
    """The entries of a tuning file by (track, pair, method); none when the file does not exist yet."""
    if not path.exists():
        return {}
    try:
        tuning = TuningFile.model_validate(json.loads(path.read_text()))
    except (ValueError, pydantic.ValidationError) as exc:
        raise KdbenchError(f"tuning file {path} is damaged ({str(exc).splitlines()[0]}); restore it from git or "
                           "re-run kdbench tune") from None
    if tuning.suite != suite:
        raise KdbenchError(f"tuning file {path} is suite {tuning.suite}'s, not {suite}'s; fix the suite's tune.file")
    return {(e.track, e.pair, e.method): e for e in tuning.entries}


def tuned_sha256(data_description: dict, pair: str, train: TrainConfig, method: str, method_version: int,
                 base_config: dict, method_space: dict, train_space: dict, budget: int, seeds: tuple[int, ...]) -> str:
    """The hash of everything a study's outcome depends on: the track's data, the pair, the base training config,
    the method (version and the config it starts from), both search spaces, the budget and the tuning seeds."""
    return sha256_of({"data": data_description, "pair": pair, "train": train.model_dump(mode="json"),
                      "method": method, "method_version": method_version, "method_config": base_config,
                      "method_space": {k: repr(v) for k, v in sorted(method_space.items())},
                      "train_space": {k: v.model_dump() for k, v in sorted(train_space.items())},
                      "budget": budget, "seeds": list(seeds), "format": TUNING_FORMAT})
