"""Suites: YAML files in ``benchmarks/suites/`` expanded into RunSpecs (track × pair × method × seed).

Merging is strict: an unknown key or a wrong type names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic import Field, PositiveInt

from kdbench.config import STRICT, MeasureConfig, RunSpec, TrainConfig
from kdbench.errors import KdbenchError
from kdbench.method import METHODS, format_validation_error, validate_config
from kdbench.models import MODELS
from kdbench.paths import shipped
from kdbench.registry import unknown_name_message
from kdbench.tracks import TRACKS
from kdbench.tuned import TuneSpec, TuningEntry, load_tuning, tuning_path, with_train_values

SUITES_DIR = shipped("suites")


class PairSpec(pydantic.BaseModel):
    model_config = STRICT
    teacher: str
    student: str
    methods: dict[str, dict] = {}  # per-pair hyperparameter overrides (e.g. which stages to tap), on top of the track's


class TrackSpec(pydantic.BaseModel):
    model_config = STRICT
    pairs: tuple[PairSpec, ...] = Field(min_length=1)
    train: TrainConfig
    teacher_train: TrainConfig | None = None  # None: a pretrained teacher used as it is
    teacher_seed: int = 0
    seeds: tuple[int, ...] | None = Field(default=None, min_length=1)  # this track's seeds, if not the suite's
    methods: dict[str, dict] = {}  # per-track hyperparameter overrides, on top of the suite's
    limit: dict[Literal["train", "val", "test"], PositiveInt] = {}  # smoke suites: at most N samples per split


class Suite(pydantic.BaseModel):
    model_config = STRICT
    name: str
    tier: str
    description: str = ""
    seeds: tuple[int, ...] = Field(min_length=1)
    all_methods: bool = False  # every registered method runs (with the overrides below where given)
    excluded: dict[str, str] = {}  # methods all_methods leaves out, each with the reason (e.g. it needs feature maps)
    methods: dict[str, dict] = {}
    measure: MeasureConfig = MeasureConfig()
    tracks: dict[str, TrackSpec] = Field(min_length=1)
    tune: TuneSpec | None = None  # kdbench tune's equal budget; its tuning file's settings are used where present


def suite_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``benchmarks/suites/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        files = suite_files()
        if name_or_path not in files:
            raise KdbenchError(unknown_name_message("suite", name_or_path, files))
        path = files[name_or_path]
    if not path.is_file():
        raise KdbenchError(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KdbenchError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        suite = Suite.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise KdbenchError(f"{path}: {format_validation_error(exc)}") from None
    _check_names(suite, path)
    if suite.tune is not None and suite.tune.file.endswith(".json"):  # a tuning file beside the suite's
        tune = suite.tune.model_copy(update={"file": str((path.parent / suite.tune.file).resolve())})
        suite = suite.model_copy(update={"tune": tune})
    return suite


def _check_names(suite: Suite, path: Path) -> None:
    for track, spec in suite.tracks.items():
        if track not in TRACKS:
            raise KdbenchError(f"{path}: {unknown_name_message('track', track, TRACKS.names())}")
        for pair in spec.pairs:
            for model in (pair.teacher, pair.student):
                if model not in MODELS:
                    raise KdbenchError(f"{path}: {unknown_name_message('model', model, MODELS.names())}")
        for method in [*suite.methods, *suite.excluded, *spec.methods, *(m for p in spec.pairs for m in p.methods)]:
            if method not in METHODS:
                raise KdbenchError(f"{path}: {unknown_name_message('method', method, METHODS.names())}")
    if suite.tune is not None:
        for track, seeds in suite.tune.seeds.items():
            if track not in suite.tracks:
                raise KdbenchError(f"{path}: tune.seeds: {unknown_name_message('track', track, suite.tracks)}")
            reported = set(suite.tracks[track].seeds or suite.seeds) & set(seeds)
            if reported:
                raise KdbenchError(f"{path}: tune.seeds of {track} include reported seed(s) {sorted(reported)}; "
                                   "tuning seeds must be disjoint from the seeds the suite reports")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' → (0, 1, 2); anything else → a one-line error."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise KdbenchError(f"--seeds {text!r}: expected comma-separated whole numbers, e.g. --seeds 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise KdbenchError(f"--seeds {text!r}: seeds must be distinct and non-negative")
    return seeds


def expand(
    suite: Suite,
    methods: list[str] | None = None,
    tracks: list[str] | None = None,
    pairs: list[str] | None = None,
    seeds: tuple[int, ...] | None = None,
    tuned: bool = True,
) -> list[RunSpec]:
    """The suite's runs, optionally narrowed; every config is validated before anything trains. With ``tuned``,
    the rows of a pair whose every row has a tuning-file entry run with their tuned values and say so
    (``tuned_entries``)."""
    for name in methods or ():
        METHODS.get(name)
    for name in tracks or ():
        if name not in suite.tracks:
            raise KdbenchError(f"suite {suite.name}: " + unknown_name_message("track", name, suite.tracks))
    all_pairs = {f"{p.teacher}:{p.student}" for spec in suite.tracks.values() for p in spec.pairs}
    for name in pairs or ():
        if name not in all_pairs:
            raise KdbenchError(f"suite {suite.name}: " + unknown_name_message("pair", name, all_pairs))
    entries = tuned_entries(suite) if tuned else {}
    method_names = methods or suite_methods(suite)
    specs = []
    for track, tspec in suite.tracks.items():
        if tracks and track not in tracks:
            continue
        for pair in tspec.pairs:
            if pairs and f"{pair.teacher}:{pair.student}" not in pairs:
                continue
            for name in method_names:
                cls = METHODS.get(name)
                overrides = {**suite.methods.get(name, {}), **tspec.methods.get(name, {}), **pair.methods.get(name, {})}
                entry = entries.get((track, f"{pair.teacher}:{pair.student}", name))
                train = with_train_values(tspec.train, entry.values.train if entry else {})
                config = validate_config(cls, {**overrides, **(entry.values.method if entry else {})}).model_dump(
                    mode="json")
                declared = tspec.seeds or suite.seeds
                for seed in seeds or declared:
                    specs.append(
                        RunSpec(
                            suite=suite.name,
                            track=track,
                            teacher=pair.teacher,
                            student=pair.student,
                            method=name,
                            method_version=cls.version,
                            method_config=config,
                            seed=seed,
                            train=train,
                            teacher_train=tspec.teacher_train,
                            teacher_seed=tspec.teacher_seed,
                            measure=suite.measure,
                            limit=tuple(sorted(tspec.limit.items())),
                            suite_seeds=declared,
                            tuning=entry.applied() if entry else None,
                        )
                    )
    return specs


def suite_methods(suite: Suite) -> list[str]:
    """Every method the suite runs on each pair."""
    return [n for n in METHODS.names() if n not in suite.excluded] if suite.all_methods else list(suite.methods)


def tuned_entries(suite: Suite) -> dict[tuple[str, str, str], TuningEntry]:
    """The tuning-file entries the suite applies: those of pairs whose every row has one. A table compares its
    rows with equal budgets, so a pair stays on the suite file's settings until all its rows are tuned."""
    if suite.tune is None:
        return {}
    entries = load_tuning(tuning_path(suite.tune), suite.name)
    names = suite_methods(suite)
    return {key: entry for key, entry in entries.items()
            if all((key[0], key[1], name) in entries for name in names)}

