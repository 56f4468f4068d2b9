"""``kdbench verify``: re-run a record's resolved config and seed, and compare the metrics.

``compare_records`` is the comparison itself; ``kdbench reproduce`` (kdbench.reproduce) uses it too.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from kdbench.config import RunSpec
from kdbench.errors import KdbenchError
from kdbench.method import METHODS
from kdbench.paths import kdbench_home
from kdbench.predictions import predictions_digest, same_predictions
from kdbench.records import load_record
from kdbench.runner import Placement, run_one

# Deterministic on the same machine: compared exactly. Timings (latency, throughput, seconds) are not compared.
EXACT = ("test_top1", "val_top1", "teacher_top1", "agreement", "params", "extra_params", "flops", "epochs",
         "int8_test_top1", "int8_val_top1")  # int8: deployment on (kdbench.metrics.int8_accuracy)
# Besides the metrics: the record's per-sample test predictions (absent on both sides counts as equal).
PREDICTIONS = "predictions"


def _plain(value):
    """As the record's JSON file holds it (tuples become lists, numbers keep their exact value)."""
    return json.loads(json.dumps(value))


def _same(a, b) -> bool:
    nans = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nans or a == b


def compare_records(committed: dict, fresh: dict) -> dict[str, tuple]:
    """What differs between two records of one run: ``{name: (committed, fresh)}``, empty when they agree.

    Compared exactly: ``status``, ``config_sha256`` (the config itself), the deterministic metrics (EXACT; only
    when both runs have the same status) and the ``predictions`` field, by the values it decodes to. Timings,
    dates, machine and git state are not compared."""
    committed, fresh = _plain(committed), _plain(fresh)
    diffs: dict[str, tuple] = {}
    for key in ("status", "config_sha256"):
        if not _same(committed.get(key), fresh.get(key)):
            diffs[key] = (committed.get(key), fresh.get(key))
    if "status" not in diffs:
        old, new = committed.get("metrics") or {}, fresh.get("metrics") or {}
        for name in EXACT:
            if not _same(old.get(name), new.get(name)):
                diffs[name] = (old.get(name), new.get(name))
    if not same_predictions(committed.get(PREDICTIONS), fresh.get(PREDICTIONS)):
        diffs[PREDICTIONS] = (committed.get(PREDICTIONS), fresh.get(PREDICTIONS))
    return diffs


def other_machine(committed: dict, fresh: dict) -> str | None:
    """How the re-run's machine differs from the record's (CPU or GPU model, the CPU's vector instructions, torch),
    when both say: float kernels differ between CPU models, instruction sets and releases, so runs are bit-exact on
    the same ones only. None when they agree."""
    was, now = committed.get("env") or {}, fresh.get("env") or {}
    moved = [f"{key} {was[key]} → {now[key]}" for key in ("cpu", "cpu_capability", "gpu", "torch")
             if was.get(key) and now.get(key) and was[key] != now[key]]
    return f"re-run on another machine ({', '.join(moved)}): bit-exact only on the record's" if moved else None


def unnamed_instructions(committed: dict, fresh: dict) -> str | None:
    """For a record made before records named the CPU's vector instructions (``env.cpu_capability``), re-run on a
    CPU of the same name: it may have other instructions (AVX2 or AVX-512 EPYCs share one name), so other float
    kernels. None when the record names them or the CPU names differ."""
    was, now = committed.get("env") or {}, fresh.get("env") or {}
    if was.get("cpu_capability") or not now.get("cpu_capability") or was.get("cpu") != now.get("cpu"):
        return None  # named, unknown here, or another CPU (other_machine says so)
    return (f"the record does not name its CPU's vector instructions (this {now.get('cpu') or 'CPU'} has "
            f"{now['cpu_capability']}): made with others, it re-runs bit-exactly only where they are the same")


def teacher_note(record, rows: list[tuple[str, object, object, bool]]) -> str | None:
    """What a differing ``teacher_top1`` means for a record whose teacher was trained and cached: the re-run read a
    cached teacher other than the record's (trained by other code, or on another machine) and every metric after it
    differs with it. None when the teachers agree, or the teacher is pretrained weights (never read from the cache)."""
    if not record.teacher_trained_from or all(ok for name, *_, ok in rows if name == "teacher_top1"):
        return None
    return (f"the teacher differs from the record's: this re-run used the one cached in {kdbench_home() / 'teachers'}; "
            "set KDBENCH_HOME to an empty folder to re-train it")


def format_value(value) -> str:
    """A cell of a comparison: ints as they are, floats to at most 4 decimals (95.2, not 95.19999999999999),
    predictions as the start of the sha256 of what they decode to (``predictions_digest``)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-4:
            return f"{value:.4g}"
        return repr(round(value, 4))
    if isinstance(value, dict):
        return f"sha256 {predictions_digest(value)[:12]}"
    return str(value)


def format_pair(old, new) -> tuple[str, str]:
    """Both cells of a row; two different values that would print alike are shown in full."""
    a, b = format_value(old), format_value(new)
    equal = same_predictions(old, new) if isinstance(old, dict) else _same(_plain(old), _plain(new))
    if a == b and not equal:
        a, b = repr(old), repr(new)
    return a, b


def verify(path: Path, place: Placement = Placement(), log=None) -> list[tuple[str, object, object, bool]]:
    """(name, recorded, re-run, match) for each deterministic metric of the record at ``path``, and for its
    predictions when either record has them; only the status when the two runs ended differently."""
    record = load_record(path)
    if record.status != "finished":
        raise KdbenchError(f"record {path} has status {record.status!r}; only finished runs can be verified")
    current = METHODS.get(record.method).version
    if current != record.method_version:
        raise KdbenchError(
            f"record {path} was made with {record.method} version {record.method_version}, the code has version "
            f"{current}; re-run it with `kdbench run --force` instead"
        )
    with tempfile.TemporaryDirectory() as scratch:
        fresh = run_one(RunSpec.from_record(record), Path(scratch), place, log, mirror=None)
    if fresh["config_sha256"] != record.config_sha256:
        raise KdbenchError(f"record {path}: the track's data no longer matches the record's config; cannot verify")
    committed = json.loads(Path(path).read_text())  # as written, not as pydantic coerces it
    diffs = compare_records(committed, fresh)
    if "status" in diffs:
        return [("status", *diffs["status"], False)]
    old, new = committed["metrics"], _plain(fresh["metrics"])
    rows = [(name, old.get(name), new.get(name), name not in diffs) for name in EXACT]
    if PREDICTIONS in committed or PREDICTIONS in fresh:
        rows.append((PREDICTIONS, committed.get(PREDICTIONS), _plain(fresh.get(PREDICTIONS)), PREDICTIONS not in diffs))
    return rows
