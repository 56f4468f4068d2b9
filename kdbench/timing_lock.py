"""Sharing one machine between parallel runs (``kdbench run --workers N``).

Training holds a shared lock for each epoch; a timed measurement (latency, throughput) takes the lock
exclusively, so it waits for the other workers to reach the end of their epoch and runs while they wait:
timings are never taken on a CPU that another run is training on. Without ``fcntl`` (Windows) there is no
lock and parallel workers' timings can disturb each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kdbench.paths import kdbench_home

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def _flock(exclusive: bool) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    path = kdbench_home() / "machine.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def training_share() -> contextlib.AbstractContextManager[None]:
    """Held while training one epoch: any number of runs at once."""
    return _flock(exclusive=False)


def exclusive_use() -> contextlib.AbstractContextManager[None]:
    """Held while timing: no run trains meanwhile."""
    return _flock(exclusive=True)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
