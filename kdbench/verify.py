"""``kdbench verify``: re-run a record's resolved config and seed, and compare the metrics."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kdbench.config import RunSpec
from kdbench.errors import KdbenchError
from kdbench.method import METHODS
from kdbench.records import load_record
from kdbench.runner import Context, run_one

# Deterministic on the same machine: compared exactly. Timings (latency, throughput, seconds) are not compared.
EXACT = ("test_top1", "val_top1", "teacher_top1", "agreement", "params", "extra_params", "flops", "epochs")


def verify(path: Path, ctx: Context = Context(), log=None) -> list[tuple[str, object, object, bool]]:
    """(metric, recorded, re-run, match) for each deterministic metric of the record at ``path``."""
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
        fresh = run_one(RunSpec.from_record(record), Path(scratch), ctx, log, mirror=None)
    if fresh["config_sha256"] != record.config_sha256:
        raise KdbenchError(f"record {path}: the track's data no longer matches the record's config; cannot verify")
    if fresh["status"] != "finished":
        return [("status", record.status, fresh["status"], False)]
    old = record.metrics.model_dump()
    return [(name, old[name], fresh["metrics"][name], old[name] == fresh["metrics"][name]) for name in EXACT]
