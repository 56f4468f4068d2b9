"""The MLflow mirror: every run's params, metrics, per-epoch curves, tags and record.

Default store: an embedded sqlite database under ``$KDBENCH_HOME`` (never the deprecated file store);
``MLFLOW_TRACKING_URI`` points it elsewhere. A tracking failure never loses a run: the record is
written first and a warning says what was not logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from filelock import FileLock

from kdbench.paths import kdbench_home


def local_store_uri() -> str:
    return f"sqlite:///{kdbench_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def artifacts_uri(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an sqlite database (``mlartifacts/`` in its folder,
    not MLflow's default ``./mlruns`` in whatever folder kdbench runs from); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def _experiment_id(mlflow, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # (mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, so read the URI the run uses)
    return mlflow.create_experiment(name, artifact_location=artifacts_uri(tracking_uri()))


def record_key(record: dict) -> str:
    """Identifies one record (one attempt of one run) in the tracking store."""
    return f"{record['config_sha256'][:16]}-seed{record['seed']}-{record['created_at']}"


def log_run(record: dict) -> bool:
    """Log one finished or failed run; warn (never raise) when the tracking store is unreachable."""
    try:
        with _writer_lock():
            _log_run(_mlflow(), record)
        return True
    except Exception as exc:  # noqa: BLE001 - tracking must never lose a run
        print(f"warning: run not logged to MLflow at {tracking_uri()}: {type(exc).__name__}: {exc}; "
              "`kdbench sync` logs it later", file=sys.stderr)
        return False


def sync(records: list[dict]) -> int:
    """Log the records that the tracking store does not have yet; returns how many were logged."""
    mlflow = _mlflow()
    known = set()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    for run in runs:
        known.add(run.data.tags.get("record_key"))
    missing = [r for r in records if record_key(r) not in known]
    return sum(log_run(r) for r in missing)


def _mlflow():
    import mlflow

    for name in ("mlflow", "alembic"):  # after the import: mlflow configures its loggers when imported
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    # an unreachable server should cost seconds, not minutes of retries (the user's settings win)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    kdbench_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _writer_lock():
    """sqlite allows one writer: processes logging to the same sqlite store take turns (a file lock)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(uri.removeprefix("sqlite:///") + ".lock")


def _log_run(mlflow, record: dict) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    experiment_id = _experiment_id(mlflow, f"kdbench-{record['suite']}")
    run_name = f"{record['track']}/{record['student']}/{record['method']}/seed{record['seed']}"
    tags = {
        "record_key": record_key(record),
        "config_sha256": record["config_sha256"],
        "git_commit": str(record["git_commit"]),
        "method": record["method"],
        "track": record["track"],
        "teacher": record["teacher"],
        "student": record["student"],
        "status": record["status"],
    }
    history = record.get("history") or []
    params = {k: str(v)[:500] for k, v in _flatten(record["config"]).items()} | {"seed": str(record["seed"])}
    curves = set(history[-1]) if history else set()
    metrics = _flatten(record["metrics"] or {})  # deployed runtimes' timings are nested (kdbench.metrics)
    final = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k not in curves}
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, row["epoch"]) for row in history for k, v in row.items() if k != "epoch"]
    points += [Metric(k, v, now, history[-1]["epoch"] if history else 0) for k, v in final.items()]
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        # one batch (one transaction in the store): a call per epoch cost about 0.1 s a run
        MlflowClient().log_batch(run.info.run_id, metrics=points, params=[Param(k, v) for k, v in params.items()],
                                 tags=[RunTag(k, str(v)[:500]) for k, v in metrics.items()
                                       if isinstance(v, str)])  # e.g. why a model was not deployed
        mlflow.log_dict(record, "record.json")
        if record["status"] != "finished":
            mlflow.end_run(status="FAILED")


def log_trial(study: str, number: int, params: dict, curve: list[float], finals: list[float]) -> None:
    """One tuning trial as an MLflow run nested under its study's run (experiment ``kdbench-tune``): its
    parameters, its validation curve (all tuning seeds in turn) and each seed's final validation top-1. Warns,
    never raises, when the store is unreachable."""
    try:
        with _writer_lock():
            mlflow = _mlflow()
            experiment_id = _experiment_id(mlflow, "kdbench-tune")
            parents = mlflow.search_runs([experiment_id], f"tags.study = '{study}' and tags.kind = 'study'",
                                         output_format="list")
            parent = parents[0].info.run_id if parents else mlflow.start_run(
                experiment_id=experiment_id, run_name=study, tags={"study": study, "kind": "study"}).info.run_id
            if not parents:
                mlflow.end_run()
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"{study} trial {number}", tags={
                    "study": study, "kind": "trial", "trial": str(number), "mlflow.parentRunId": parent}):
                mlflow.log_params(params)
                for step, value in enumerate(curve, 1):
                    mlflow.log_metric("val_top1", value, step=step)
                if finals:
                    mlflow.log_metric("mean_final_val_top1", sum(finals) / len(finals))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a search
        print(f"warning: trial {number} of {study} not logged to MLflow at {tracking_uri()}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
