"""What every run measures: accuracy, agreement, parameters, FLOPs, latency, throughput.

FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs), timings from
``torch.utils.benchmark`` timers (eval mode, inference mode, fixed thread count, warm-up, median and IQR
of repeated blocks, the student's and the teacher's blocks alternating).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA toolkit on CPU machines
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from kdbench.models import count_params, model_device
from kdbench.tracks import Split


@torch.inference_mode()
def predict(model: nn.Module, split: Split) -> torch.Tensor:
    """Top-1 predicted class of every sample, in eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    preds = torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in split.batches(split.eval_batch)])
    model.train(was_training)
    return preds


def top1(preds: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * (preds == target).double().mean().item()


def flops_per_sample(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``sample`` (one input, with its batch dimension of 1)."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(sample.to(model_device(model)))
    return int(counter.get_total_flops())


BLOCK_SECONDS = 0.01  # one timed block: long enough for the clock, short next to the machine's drift
MIN_ROUNDS = 3  # blocks per model at least, so that an IQR exists however slow the model


def forward_times(models: Sequence[nn.Module], sample: torch.Tensor, batch: int, threads: int,
                  min_run_time: float) -> list[tuple[float, float]]:
    """(median, IQR) in milliseconds of one forward pass of each model on ``sample`` repeated to ``batch`` inputs.

    The models are timed in alternating blocks of about ``BLOCK_SECONDS`` (round robin, ``min_run_time`` per
    model in all): a shared machine's speed drifts by tens of percent over seconds, and models timed in the same
    rounds see the same drift, so their ratio (the leaderboard's *× faster*) holds where back-to-back windows
    did not (``benchmarks/test_perf.py::test_latency_repeatability`` measures both)."""
    timers, numbers = [], []
    with torch.inference_mode():
        for model in models:
            model.eval()
            x = sample.expand(batch, *sample.shape[1:]).contiguous().to(model_device(model))
            timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
            number = 1
            while timer.timeit(number).raw_times[0] < BLOCK_SECONDS:  # the first pass is the warm-up
                number *= 2
            timers.append(timer)
            numbers.append(number)
        per_run = [[] for _ in models]
        deadline = time.perf_counter() + min_run_time * len(models)
        while len(per_run[0]) < MIN_ROUNDS or time.perf_counter() < deadline:
            for timer, number, times in zip(timers, numbers, per_run):
                times.extend(timer.timeit(number).times)
    return [(1e3 * statistics.median(t), 1e3 * _iqr(t)) for t in per_run]


def _iqr(values: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def cost_metrics(models: Sequence[nn.Module], sample: torch.Tensor, threads: int, throughput_batch: int,
                 min_run_time: float) -> list[dict]:
    """Size and speed of each model on a real input ``sample`` (batch of 1): params, FLOPs, batch-1 latency,
    batch-N throughput, on the device the model is on; the models are timed side by side (``forward_times``)."""
    latencies = forward_times(models, sample, 1, threads, min_run_time)
    batch_times = forward_times(models, sample, throughput_batch, threads, min_run_time)
    return [
        {
            "params": count_params(model),
            "flops": flops_per_sample(model, sample),
            "latency_b1_ms": median_ms,
            "latency_b1_iqr_ms": iqr_ms,
            "throughput_bN": throughput_batch / (batch_ms / 1e3),
            "throughput_batch": throughput_batch,
        }
        for model, (median_ms, iqr_ms), (batch_ms, _) in zip(models, latencies, batch_times)
    ]
