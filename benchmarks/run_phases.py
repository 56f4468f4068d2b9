"""Where a `kdbench run` spends its time, phase by phase: each run's training (``fit``) against what is measured
and recorded around it (the ONNX export and int8 accuracy, predictions, the MLflow mirror), summed over the runs.

    python benchmarks/run_phases.py --suite cpu --track digits --pair cnn2d_w32:cnn2d_w16 --seeds 0 --workers 1 \\
        --force --results-dir /tmp/phases

Takes `kdbench run`'s arguments; needs ``--workers 1`` (the phases are timed in this process). Prints the seconds
of each phase, and the time per run besides training: ``run_one`` less ``fit``. The phases overlap (``export`` is
inside ``int8_accuracy``, both inside ``train_and_measure``); the teacher's training is inside ``prepare``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import defaultdict

from kdbench import deploy, executor, runner, tracking
from kdbench.cli import main

PHASES = {runner: ("run_one", "train_and_measure", "prepare", "fit", "predict", "run_metrics", "int8_accuracy",
                   "split_predictions", "write_record"),
          deploy: ("export", "check_outputs", "quantize", "session"),
          tracking: ("_log_run",)}  # the MLflow mirror (run_one's default ``mirror`` is bound to log_run already)


def timed(seconds: dict, calls: dict, module, name: str) -> None:
    """Replace ``module.name`` with a wrapper that adds each call's seconds to ``seconds[name]``."""
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            calls[name] += 1

    setattr(module, name, wrapper)


if __name__ == "__main__":
    if "--workers" not in sys.argv or sys.argv[sys.argv.index("--workers") + 1] != "1":
        sys.exit("run_phases.py: give --workers 1 (the phases are timed in this process)")
    seconds, calls = defaultdict(float), defaultdict(int)
    for module, names in PHASES.items():
        for name in names:
            timed(seconds, calls, module, name)
    executor.run_one = runner.run_one  # the executor imported it before the wrapping
    start = time.perf_counter()
    code = main(["run", *sys.argv[1:]])
    total = time.perf_counter() - start
    print(f"\n{'phase':20s} {'seconds':>9s} {'calls':>6s}")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"{name:20s} {value:9.2f} {calls[name]:6d}")
    runs = calls["run_one"]
    if runs:
        print(f"\n{runs} runs in {total:.1f} s; besides training {(seconds['run_one'] - seconds['fit']) / runs:.2f} s a run "
              f"(run_one less fit), outside the runs {total - seconds['run_one']:.1f} s")
    sys.exit(code)
