"""Latency and throughput timed once per student architecture, side by side with its teacher.

All students of a track's teacher (the three sizes of a CPU track) are timed in one round robin with the
teacher (``kdbench.metrics.forward_times``), so a machine's drift slows them alike and identical students never
show different speeds. Every run of a pair shares its one timing, written beside the pair's records as
``timing.json``; the leaderboard reads it. Weights do not change the cost of these dense models, so the
models are timed at their initial (seeded, or pretrained where a model starts from pretrained) weights.
With deployment on (the suite's ``measure.deployment``), each model is also exported to ONNX and timed in ONNX
Runtime, in fp32 and after int8 quantization calibrated on the track's training split, in the same rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdbench import deploy
from kdbench.config import RunSpec
from kdbench.timing_lock import exclusive_use
from kdbench.metrics import CHECK_INPUTS, calibration_for, cost_metrics
from kdbench.models import create_model
from kdbench.records import environment, git_state, now_iso, write_atomic

TIMING_FILE = "timing.json"


def timing_path(results_dir: Path, suite: str, track: str, teacher: str, student: str) -> Path:
    return Path(results_dir) / suite / track / f"{teacher}--{student}" / TIMING_FILE


def load_timing(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def time_architectures(specs: list[RunSpec], results_dir: Path, data_for, device: str = "cpu", force: bool = False,
                       log=None, data_root: Path | None = None) -> list[Path]:
    """Time each teacher with all its students in ``specs`` that lack a timing (all of them with ``force``) and
    write one ``timing.json`` per pair; returns the files written. ``data_for(spec)`` gives a spec's track data;
    models with pretrained weights load them from ``data_root``."""
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.suite, spec.track, spec.teacher, spec.measure, spec.limit), []).append(spec)
    written = []
    for (suite, track, teacher, measure, _), group in groups.items():
        students = sorted({s.student for s in group})
        paths = {s: timing_path(results_dir, suite, track, teacher, s) for s in students}
        current = {s: load_timing(p) for s, p in paths.items()}
        if not force and all(t and t.get("measure") == measure.model_dump(mode="json") for t in current.values()):
            continue
        data = data_for(group[0])
        torch.manual_seed(0)
        models = [create_model(name, data.num_classes, data.in_shape, data_root).to(device) for name in (teacher, *students)]
        if log:
            log(f"timing {track}: {teacher} with {', '.join(students)} side by side")
        with exclusive_use():  # no parallel run trains while these are timed
            teacher_cost, *student_costs = cost_metrics(models, data.test.sample(CHECK_INPUTS), measure.threads,
                                                        measure.throughput_batch, measure.min_run_time,
                                                        calibration_for(data, measure))
        commit, dirty = git_state()
        for student, cost in zip(students, student_costs):
            timing = {"suite": suite, "track": track, "teacher": teacher, "student": student,
                      "timed_with": [teacher, *students], "measure": measure.model_dump(mode="json"),
                      "student_cost": cost, "teacher_cost": teacher_cost,
                      "env": environment(measure.threads, device) | (deploy.versions() if measure.deployment else {}),
                      "git_commit": commit, "git_dirty": dirty, "created_at": now_iso()}
            write_atomic(paths[student], json.dumps(timing, indent=2, sort_keys=True) + "\n")
            written.append(paths[student])
    return written
