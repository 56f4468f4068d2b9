"""``kdbench reproduce``: re-train a suite's runs from a cold teacher cache and compare each fresh record with the
committed one (kdbench.verify.compare_records).

Everything the runs write goes to a scratch folder: records under ``<scratch>/results``, and a kdbench home of
its own, ``<scratch>/home`` (teacher checkpoints, teacher outputs, training checkpoints, the machine lock, an
sqlite MLflow store), so every teacher is trained again and the user's cache and store are not touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import RunSpec
from kdbench.errors import KdbenchError
from kdbench.executor import execute
from kdbench.records import load_record, record_path
from kdbench.runner import Placement
from kdbench.verify import EXACT, PREDICTIONS, compare_records, format_value, other_machine, unnamed_instructions

HOME_ENV = ("KDBENCH_HOME", "MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class Outcome:
    """One re-trained run: its fresh record, the committed one (None when there is none) and what differs."""

    spec: RunSpec
    fresh: dict
    committed: dict | None
    differences: dict[str, tuple]

    @property
    def reproduced(self) -> bool:
        return self.committed is not None and not self.differences

    def verdict(self) -> str:
        if self.committed is None:
            return "no committed record"
        return "bit-exact" if not self.differences else "differs: " + ", ".join(self.differences)


@contextmanager
def cold_home(scratch: Path) -> Iterator[Path]:
    """Within the block, KDBENCH_HOME is ``<scratch>/home`` and MLFLOW_TRACKING_URI an sqlite store in it (the
    spawned workers of kdbench.executor inherit both), and this process holds no teacher outputs in memory;
    the environment is restored after."""
    from kdbench import teachers

    home = (Path(scratch) / "home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in HOME_ENV}
    os.environ["KDBENCH_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    teachers._MEMORY.clear()  # outputs computed from the user's cached teachers would make the cache warm
    try:
        yield home
    finally:
        teachers._MEMORY.clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_scratch(scratch: Path) -> None:
    """A scratch folder must be new or empty: a teacher cached there by an earlier run would not be cold."""
    if scratch.exists() and (not scratch.is_dir() or any(scratch.iterdir())):
        raise KdbenchError(f"--scratch {scratch} is not an empty folder: give a new one, so that the teacher "
                           "cache starts cold")


def _check_results_dir(results_dir: Path) -> None:
    if not Path(results_dir).is_dir():
        raise KdbenchError(f"--results-dir {results_dir} is not a folder: nothing to compare the runs with")


def split_unrun_rows(specs: list[RunSpec], results_dir: Path) -> tuple[list[RunSpec], list[str]]:
    """(the runs of rows that have committed records, the rows that have none yet): a method added to the
    suite but not run yet has nothing to reproduce, while a row missing some of its records still fails."""
    _check_results_dir(results_dir)

    def has_records(spec: RunSpec) -> bool:
        return any(record_path(results_dir, spec).parent.glob("seed*.json"))

    kept = [spec for spec in specs if has_records(spec)]
    unrun = sorted({f"{s.track} {s.pair} {s.method}" for s in specs if not has_records(s)})
    return kept, unrun


def committed_records(specs: list[RunSpec], results_dir: Path) -> dict[Path, dict | None]:
    """The committed record of each run (by its path under ``results_dir``) as its JSON file holds it, None
    where there is none; a damaged one fails here, before anything trains."""
    _check_results_dir(results_dir)
    out = {}
    for spec in specs:
        path = record_path(results_dir, spec)
        if path.exists():
            load_record(path)  # validated: a truncated or tampered file is named in one line
        out[path] = json.loads(path.read_text()) if path.exists() else None
    return out


def reproduce(specs: list[RunSpec], results_dir: Path, scratch: Path, place: Placement, workers: int,
              log: Callable[[str], None] | None = None) -> Iterator[Outcome]:
    """Train every spec (never skipped) into ``<scratch>/results``; yields each run compared with its committed
    record under ``results_dir`` as it finishes. The committed records are read (and checked) at once, before
    anything trains. Iterate it inside ``cold_home(scratch)``."""
    committed = committed_records(specs, results_dir)

    def outcomes() -> Iterator[Outcome]:
        for spec, fresh in execute(specs, Path(scratch) / "results", place, workers, log):
            old = committed[record_path(results_dir, spec)]
            yield Outcome(spec, fresh, old, compare_records(old, fresh) if old is not None else {})

    return outcomes()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_verdict(outcomes: list[Outcome]) -> str:
    """One leaderboard row's runs in a few words: "3/3 bit-exact", or what differed, in how many runs, and by
    how much at most ("test_top1 differs in 2 of 3 (max |Δ| 0.1)"), or "no committed record"."""
    n = len(outcomes)
    compared = [o for o in outcomes if o.committed is not None]
    if not compared:
        return "no committed record"
    exact = sum(o.reproduced for o in outcomes)
    parts = []
    names = list(dict.fromkeys(name for o in compared for name in o.differences))
    for name in names:
        pairs = [o.differences[name] for o in compared if name in o.differences]
        verb = "differ" if name == PREDICTIONS else "differs"
        text = f"{name} {verb} in {len(pairs)} of {n}"
        deltas = [abs(new - old) for old, new in pairs if name in EXACT and _number(old) and _number(new)]
        if deltas:
            text += f" (max |Δ| {format_value(max(deltas))})"
        elif name == "status":
            text += " (" + ", ".join(sorted({f"{old} → {new}" for old, new in pairs})) + ")"
        parts.append(text)
    if len(compared) < n:
        parts.append(f"no committed record for {n - len(compared)} of {n}")
    notes = [note(o.committed, o.fresh) for o in compared if o.differences
             for note in (other_machine, unnamed_instructions)]
    parts += list(dict.fromkeys(note for note in notes if note))
    return f"{exact}/{n} bit-exact" + ("" if not parts else ": " + "; ".join(parts))


def row_verdicts(outcomes: list[Outcome], specs: list[RunSpec]) -> list[tuple[str, str, str, str]]:
    """(track, teacher:student, method, verdict) for each leaderboard row, in the suite's order."""
    rows: dict[tuple[str, str, str], list[Outcome]] = {}
    for spec in specs:
        rows.setdefault((spec.track, f"{spec.teacher}:{spec.student}", spec.method), [])
    for outcome in outcomes:
        s = outcome.spec
        rows[(s.track, f"{s.teacher}:{s.student}", s.method)].append(outcome)
    return [(*key, row_verdict(group)) for key, group in rows.items() if group]
