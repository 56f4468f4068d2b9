"""Where the runs of a grid execute: in this process one after another, in N worker processes at once, or as
Ray tasks on a cluster.

Local workers are separate processes (spawned, so each has its own torch thread pool); each trains with the
thread count its config fixes, and timed measurements take the machine exclusively (kdbench.timing_lock), so
records are the same as a sequential run's apart from timings. On Ray each run is one task holding the CPUs
its training threads need (and one GPU on a GPU device); it logs to the MLflow store the driver names and
returns its record, which the driver writes under the results folder.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from kdbench.config import RunSpec
from kdbench.errors import KdbenchError
from kdbench.timing_lock import usable_cpus
from kdbench.records import record_path, write_record
from kdbench.runner import Placement, run_one, train_and_measure
from kdbench.tracking import log_run, tracking_uri
from kdbench.paths import kdbench_home

FORWARDED_ENV = ("KDBENCH_HOME", "MLFLOW_TRACKING_URI", "KDBENCH_METHODS_PATH", "KDBENCH_TEACHER_CACHE",
                 "KDBENCH_TEACHER_CACHE_MB", "KDBENCH_NUM_WORKERS")


def run_threads(spec: RunSpec) -> int | None:
    """CPU threads a run trains with (its own and its teacher's schedule); None when torch picks (all cores)."""
    schedules = [spec.train, *([spec.teacher_train] if spec.teacher_train else [])]
    if any(s.threads is None for s in schedules):
        return None
    return max(s.threads for s in schedules)


def auto_workers(specs: list[RunSpec], place: Placement) -> int:
    """One run per share of the CPUs its training threads need; one at a time on a GPU, with unset threads or
    under DDP (each run then takes every process)."""
    threads = [run_threads(s) for s in specs]
    if not specs or place.device != "cpu" or place.ranks or None in threads:
        return 1
    return max(1, min(len(specs), usable_cpus() // max(threads)))


def execute(specs: list[RunSpec], results_dir: Path, place: Placement, workers: int, log=None
            ) -> Iterator[tuple[RunSpec, dict]]:
    """Run every spec on this machine; yields (spec, record) as each finishes (in order when ``workers`` is 1)."""
    if workers <= 1:
        for spec in specs:
            yield spec, run_one(spec, results_dir, place, log)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending = {pool.submit(run_one, spec, results_dir, place): spec for spec in specs}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    except BaseException:  # interrupted (Ctrl-C, SIGTERM), a worker lost, or the caller stopped reading
        _stop_workers(pool)
        raise
    pool.shutdown()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's worker processes now, rather than letting them finish their runs and the ones queued to
    them: the records of finished runs stay, a run in flight leaves none (records are written atomically)."""
    if hasattr(pool, "terminate_workers"):  # Python ≥ 3.14
        pool.terminate_workers()
        return
    for process in list((pool._processes or {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def execute_on_ray(specs: list[RunSpec], results_dir: Path, place: Placement, address: str | None = None, log=None
                   ) -> Iterator[tuple[RunSpec, dict]]:
    """Run every spec as a Ray task (a new local Ray instance without ``address``); yields (spec, record) as
    each finishes, after writing the record. A failed task cancels the rest; records already written stay."""
    if not specs:
        return
    ray = _import_ray()
    env = _task_env(address)
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
             **({} if address else {"num_cpus": usable_cpus()}))
    try:
        cluster = ray.cluster_resources()
        if log:
            store = env.get("MLFLOW_TRACKING_URI", "each node's local store (set MLFLOW_TRACKING_URI to a server)")
            log(f"Ray cluster: {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU; runs log to MLflow at {store}")
        gpus = 0 if place.device == "cpu" else 1
        if gpus > cluster.get("GPU", 0):
            raise KdbenchError(f"--device {place.device}: the Ray cluster has no GPU; use --device cpu")
        task = ray.remote(_ray_task)
        pending = {}
        for spec in specs:
            cpus = min(run_threads(spec) or usable_cpus(), cluster.get("CPU", 1))
            pending[task.options(num_cpus=cpus, num_gpus=gpus).remote(spec, place)] = spec
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done[0])
                try:
                    record = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, Exception) else exc
                    raise KdbenchError(f"{spec.label()} failed on Ray: {type(cause).__name__}: "
                                       f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from None
                write_record(record_path(results_dir, spec), record)
                yield spec, record
        finally:
            for ref in pending:
                ray.cancel(ref)
    finally:
        ray.shutdown()


def _ray_task(spec: RunSpec, place: Placement) -> dict:
    """One run on a Ray worker: train, measure, log to MLflow; the record goes back to the driver."""
    record = train_and_measure(spec, place)
    log_run(record)
    return record


def _task_env(address: str | None) -> dict[str, str]:
    """The kdbench settings of the driver's environment, for its tasks. A local instance shares this machine,
    so its tasks also get the kdbench home (teacher cache, machine lock) and the MLflow store as this process
    resolves them; on a cluster, unset ones stay each node's own."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if address is None:
        env |= {"KDBENCH_HOME": str(kdbench_home()), "MLFLOW_TRACKING_URI": tracking_uri()}
    return env


def _import_ray():
    try:
        import ray
    except ImportError:
        raise KdbenchError("--executor ray needs Ray: pip install 'kdbench[ray]' (or pip install ray)") from None
    return ray
