"""What every run measures: accuracy, agreement, parameters, FLOPs, latency, throughput.

FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs), timings from
``torch.utils.benchmark`` (eval mode, inference mode, fixed thread count, warm-up, median and IQR
of repeated blocks).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA toolkit on CPU machines
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from kdbench.models import count_params
from kdbench.tracks import Split

EVAL_BATCH = 1000


@torch.inference_mode()
def predict(model: nn.Module, split: Split) -> torch.Tensor:
    """Top-1 predicted class of every sample, in eval mode."""
    was_training = model.training
    model.eval()
    preds = torch.cat([model(split.x[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(split), EVAL_BATCH)])
    model.train(was_training)
    return preds


def top1(preds: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * (preds == target).double().mean().item()


def flops_per_sample(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *in_shape))
    return int(counter.get_total_flops())


def latency(model: nn.Module, in_shape: tuple[int, ...], batch: int, threads: int, min_run_time: float) -> tuple[float, float]:
    """(median, IQR) in milliseconds of one forward pass at ``batch``."""
    model.eval()
    x = torch.randn(batch, *in_shape)
    with torch.inference_mode():
        model(x)  # warm-up outside the timed blocks
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def cost_metrics(model: nn.Module, in_shape: tuple[int, ...], threads: int, throughput_batch: int, min_run_time: float) -> dict:
    """Size and speed of one model: params, FLOPs, batch-1 latency, batch-N throughput."""
    median_ms, iqr_ms = latency(model, in_shape, 1, threads, min_run_time)
    batch_ms, _ = latency(model, in_shape, throughput_batch, threads, min_run_time)
    return {
        "params": count_params(model),
        "flops": flops_per_sample(model, in_shape),
        "latency_b1_ms": median_ms,
        "latency_b1_iqr_ms": iqr_ms,
        "throughput_bN": throughput_batch / (batch_ms / 1e3),
        "throughput_batch": throughput_batch,
    }
