"""Where the runs of a grid execute: in this process one after another, or in N worker processes at once.

Workers are separate processes (spawned, so each has its own torch thread pool); each trains with the thread
count its config fixes, and timed measurements take the machine exclusively (kdbench.machine), so records are
the same as a sequential run's apart from timings.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from kdbench.config import RunSpec
from kdbench.machine import usable_cpus
from kdbench.runner import Context, run_one


def auto_workers(specs: list[RunSpec], ctx: Context) -> int:
    """One run per share of the CPUs its training threads need; one at a time on a GPU or with unset threads."""
    if not specs or ctx.device != "cpu" or any(s.train.threads is None for s in specs):
        return 1
    threads = max(max(s.train.threads, (s.teacher_train.threads or 1) if s.teacher_train else 1) for s in specs)
    return max(1, min(len(specs), usable_cpus() // threads))


def execute(specs: list[RunSpec], results_dir: Path, ctx: Context, workers: int, log=None
            ) -> Iterator[tuple[RunSpec, dict]]:
    """Run every spec; yields (spec, record) as each finishes (in order when ``workers`` is 1)."""
    if workers <= 1:
        for spec in specs:
            yield spec, run_one(spec, results_dir, ctx, log)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(run_one, spec, results_dir, ctx): spec for spec in specs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        finally:
            for future in pending:
                future.cancel()
