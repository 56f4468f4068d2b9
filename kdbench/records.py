"""Run records: one JSON file per run under ``results/``, written atomically.

The records are the source of truth; the leaderboard is built from them alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pydantic
import torch

from kdbench.config import RunSpec, sha256_of
from kdbench.errors import KdbenchError
from kdbench.method import format_validation_error
from kdbench.paths import CHECKOUT

SCHEMA_VERSION = 2  # 2: per-sample predictions, the suite's seeds; latency timed per architecture


class Metrics(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    test_top1: float
    val_top1: float
    teacher_top1: float | None
    agreement: float | None
    params: int
    extra_params: int
    flops: int
    latency_b1_ms: float | None = None  # benchmark runs: timed once per architecture (kdbench.timing)
    latency_b1_iqr_ms: float | None = None
    throughput_bN: float | None = None
    int8_test_top1: float | None = None  # deployment on (kdbench.metrics.int8_accuracy): after int8 quantization
    int8_val_top1: float | None = None
    onnx_max_abs_diff: float | None = None  # the fp32 export's largest difference from eager
    deployment_error: str | None = None  # why the student could not be exported or quantized
    train_seconds: float
    epochs: int


class Env(pydantic.BaseModel):
    python: str
    torch: str
    platform: str
    cpu: str
    gpu: str | None
    threads: int
    kdbench: str | None = None  # the installed release (older records lack it)
    onnxruntime: str | None = None  # runs with deployment on: the runtime and exporter that ran the int8 student
    onnx: str | None = None
    int8_weight_bits: int | None = None  # 7 where the CPU's int8 kernels would clip (kdbench.deploy.int8_saturates)
    cpu_capability: str | None = None  # the vector instructions torch's CPU kernels use (AVX2, AVX512, ...)


class Record(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    schema_version: Literal[1, 2]
    suite: str
    track: str
    teacher: str
    student: str
    method: str
    method_version: int
    seed: int
    suite_seeds: list[int] = []  # the seeds the suite declares for this row: fewer finished ones is incomplete
    status: Literal["finished", "failed"]
    error: str | None = None
    config: dict
    config_sha256: str
    git_commit: str | None
    git_dirty: bool | None
    created_at: str
    env: Env
    metrics: Metrics | None
    history: list[dict] = []  # per-epoch training losses and validation accuracy
    teacher_outputs: dict | None = None  # whether the teacher's outputs came from the cache, its key, or why not
    predictions: dict | None = None  # per-sample test and validation predictions (kdbench.predictions)
    source: dict | None = None  # a teacher ensemble or assistants the method distilled from (kdbench.sources)
    teacher_trained_from: dict | None = None  # git commit and dirtiness of the code that trained the cached teacher


def record_path(results_dir: Path, spec: RunSpec) -> Path:
    return Path(results_dir) / spec.suite / spec.track / f"{spec.teacher}--{spec.student}" / spec.method / f"seed{spec.seed}.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, device: str = "cpu") -> dict:
    """Where the run computed; ``gpu`` names the GPU only when the run used one."""
    on_gpu = torch.device(device).type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if on_gpu else None,
        "threads": threads,
        "kdbench": _release(),
    }


def _release() -> str | None:
    try:
        return importlib.metadata.version("kdbench")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH
        return None


# Generated outputs (run records, the leaderboard, the methods page): changing them does not make the code dirty.
GENERATED = (":!results", ":!leaderboard.md", ":!methods/README.md")


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``root`` (default: the one kdbench runs from); (None, None) outside
    git and for an installed wheel (``env.kdbench`` then says which release ran). Dirty: anything but the generated outputs differs from HEAD, untracked files that git does not ignore
    included."""
    root = Path(root) if root is not None else CHECKOUT
    if root is None:
        return None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--", ".", *GENERATED],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def would_dirty_checkout(folder: Path) -> bool:
    """Whether records written to ``folder`` would make the checkout kdbench runs from dirty (and so every record
    made after them): inside it, outside ``results/`` and not ignored by git."""
    if CHECKOUT is None:
        return False
    folder = Path(folder).resolve()
    if not folder.is_relative_to(CHECKOUT) or folder.is_relative_to(CHECKOUT / "results"):
        return False
    ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "x.json")], cwd=CHECKOUT, capture_output=True)
    return ignored.returncode == 1  # 0: ignored; 128: not a git repository


# The fields that say which run a record is: its suite and seed, and these, copied from its config.
IDENTITY = ("track", "teacher", "student", "method", "method_version")


def new_record(suite: str, seed: int, config: dict, threads: int, device: str, **fields) -> dict:
    """The start of a run record, as benchmark runs and the Python API both make it: what ran (named by the
    config), its config and hash, the commit and whether the tree had uncommitted changes, when and where;
    ``fields`` add the rest."""
    commit, dirty = git_state()
    return {
        "schema_version": SCHEMA_VERSION, "suite": suite, **{key: config[key] for key in IDENTITY}, "seed": seed,
        "config": config,
        "config_sha256": sha256_of(config), "git_commit": commit, "git_dirty": dirty, "created_at": now_iso(),
        "env": environment(threads, device),
    } | fields


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder + fsync + rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: dict) -> None:
    Record.model_validate(record)  # never write a record the leaderboard would refuse
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_record(path: Path) -> Record:
    """A validated record; a truncated or tampered file → one line naming it."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KdbenchError(f"record {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdbenchError(f"record {path} is not valid JSON ({exc}); restore it from git or re-run it with --force") from None
    if not isinstance(raw, dict) or not {"schema_version", "config_sha256", "metrics"} & raw.keys():
        raise KdbenchError(f"{path} is not a kdbench run record (it has none of schema_version, config_sha256, "
                           "metrics); give the path of a results/…/seedN.json file")
    try:
        return Record.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise KdbenchError(f"record {path} is malformed: {format_validation_error(exc)}") from None


def load_records(results_dir: Path) -> list[tuple[Path, Record]]:
    return [(p, load_record(p)) for p in sorted(Path(results_dir).rglob("seed*.json"))]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


