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


def latency(model: nn.Module, sample: torch.Tensor, batch: int, threads: int, min_run_time: float) -> tuple[float, float]:
    """(median, IQR) in milliseconds of one forward pass on ``sample`` repeated to ``batch`` inputs."""
    model.eval()
    x = sample.expand(batch, *sample.shape[1:]).contiguous().to(model_device(model))
    with torch.inference_mode():
        model(x)  # warm-up outside the timed blocks
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def cost_metrics(model: nn.Module, sample: torch.Tensor, threads: int, throughput_batch: int, min_run_time: float) -> dict:
    """Size and speed of one model on a real input ``sample`` (batch of 1): params, FLOPs, batch-1 latency,
    batch-N throughput, on the device the model is on."""
    median_ms, iqr_ms = latency(model, sample, 1, threads, min_run_time)
    batch_ms, _ = latency(model, sample, throughput_batch, threads, min_run_time)
    return {
        "params": count_params(model),
        "flops": flops_per_sample(model, sample),
        "latency_b1_ms": median_ms,
        "latency_b1_iqr_ms": iqr_ms,
        "throughput_bN": throughput_batch / (batch_ms / 1e3),
        "throughput_batch": throughput_batch,
    }
