"""What every run measures: accuracy, agreement, parameters, FLOPs, latency, throughput, and with deployment on,
the same timings in ONNX Runtime (fp32 and int8) and the student's accuracy after int8 quantization.

FLOPs come from ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs), timings from
``torch.utils.benchmark`` timers (eval mode, inference mode, fixed thread count, warm-up, median and IQR
of repeated blocks, the student's and the teacher's blocks alternating, in every runtime).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA toolkit on CPU machines
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from kdbench import deploy
from kdbench.config import MeasureConfig
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


def time_calls(calls: Sequence[Callable[[], object]], threads: int, min_run_time: float) -> list[tuple[float, float]]:
    """(median, IQR) in milliseconds of each zero-argument call.

    The calls are timed in alternating blocks of about ``BLOCK_SECONDS`` (round robin, ``min_run_time`` per
    call in all): a shared machine's speed drifts by tens of percent over seconds, and calls timed in the same
    rounds see the same drift, so their ratio (the leaderboard's *× faster*) holds where back-to-back windows
    did not (``benchmarks/test_perf.py::test_latency_repeatability`` measures both)."""
    timers, numbers = [], []
    with torch.inference_mode():
        for call in calls:
            timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
            number = 1
            while timer.timeit(number).raw_times[0] < BLOCK_SECONDS:  # the first pass is the warm-up
                number *= 2
            timers.append(timer)
            numbers.append(number)
        per_run = [[] for _ in calls]
        deadline = time.perf_counter() + min_run_time * len(calls)
        while len(per_run[0]) < MIN_ROUNDS or time.perf_counter() < deadline:
            for timer, number, times in zip(timers, numbers, per_run):
                times.extend(timer.timeit(number).times)
    return [(1e3 * statistics.median(t), 1e3 * _iqr(t)) for t in per_run]


def forward_times(models: Sequence[nn.Module], sample: torch.Tensor, batch: int, threads: int,
                  min_run_time: float) -> list[tuple[float, float]]:
    """(median, IQR) in milliseconds of one eager forward pass of each model (eval mode) on ``sample`` repeated to
    ``batch`` inputs, the models timed side by side (``time_calls``)."""
    return time_calls([_eager_call(model, sample, batch) for model in models], threads, min_run_time)


def _eager_call(model: nn.Module, sample: torch.Tensor, batch: int) -> Callable[[], object]:
    model.eval()
    x = _batch_of(sample, batch).to(model_device(model))
    return lambda: model(x)


def _batch_of(sample: torch.Tensor, batch: int) -> torch.Tensor:
    return sample[:1].expand(batch, *sample.shape[1:]).contiguous()


def _iqr(values: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


RUNTIMES = ("onnxruntime", "onnxruntime_int8")  # deployed runtimes timed beside eager (kdbench.deploy)
CHECK_INPUTS = 64  # real test inputs on which an export's outputs are compared with eager


def calibration_for(data, measure: MeasureConfig) -> torch.Tensor | None:
    """The int8 calibration inputs drawn from ``data.train`` when ``measure`` deploys models, else None."""
    return deploy.calibration_inputs(data.train, measure.int8_calibration) if measure.deployment else None


def cost_metrics(models: Sequence[nn.Module], inputs: torch.Tensor, threads: int, throughput_batch: int,
                 min_run_time: float, calibration: torch.Tensor | None = None) -> list[dict]:
    """Size and speed of each model on real ``inputs`` (the first is the timed sample): params, FLOPs, batch-1
    latency, batch-N throughput, on the device the model is on, the models timed side by side (``time_calls``).
    With ``calibration`` (deployment), each model is also exported to ONNX (its outputs checked on ``inputs``),
    quantized to int8 (calibrated on ``calibration``) and timed in ONNX Runtime in the same rounds as eager:
    the entries ``onnxruntime`` and ``onnxruntime_int8`` hold its timings, or the ``error`` that kept it out."""
    sample = inputs[:1]
    deployed = [_deployed(model, inputs, calibration, threads) for model in models] if calibration is not None else []
    entries = [{"params": count_params(model), "flops": flops_per_sample(model, sample),
                "throughput_batch": throughput_batch} for model in models]
    for entry, (_, about) in zip(entries, deployed):
        entry.update(about)
    for batch, fields in ((1, ("latency_b1_ms", "latency_b1_iqr_ms")), (throughput_batch, ("batch_ms",))):
        calls, places = [], []
        for i, model in enumerate(models):
            calls.append(_eager_call(model, sample, batch))
            places.append(entries[i])
            for name, sess in (deployed[i][0].items() if deployed else ()):
                calls.append(_session_call(sess, sample, batch))
                places.append(entries[i][name])
        for place, (median_ms, iqr_ms) in zip(places, time_calls(calls, threads, min_run_time)):
            place.update(zip(fields, (median_ms, iqr_ms)))
    for entry in entries:
        for place in (entry, *(entry[name] for name in RUNTIMES if "batch_ms" in entry.get(name, {}))):
            place["throughput_bN"] = throughput_batch / (place.pop("batch_ms") / 1e3)
    return entries


def _session_call(sess, sample: torch.Tensor, batch: int) -> Callable[[], object]:
    feed = {deploy.INPUT: _batch_of(sample, batch).cpu().numpy()}
    return lambda: sess.run(None, feed)


def _deployed(model: nn.Module, inputs: torch.Tensor, calibration: torch.Tensor, threads: int) -> tuple[dict, dict]:
    """(ONNX Runtime sessions by runtime, what each runtime's entry starts with: its provider and, for fp32, the
    export's largest difference from eager; or the error that kept the model out of it). The export is checked
    on the CPU; fp32 runs on the model's device, int8 on the CPU."""
    try:
        exported, max_diff = deploy.export_checked(model, inputs, threads)
    except deploy.NotDeployable as exc:
        return {}, {name: {"error": str(exc)} for name in RUNTIMES}
    device = model_device(model)
    makers = {"onnxruntime": (device, lambda: deploy.session(exported, threads, device)),
              "onnxruntime_int8": ("cpu", lambda: deploy.session(deploy.quantize(exported, calibration), threads))}
    sessions, about = {}, {}
    for name, (where, make) in makers.items():
        try:
            sessions[name] = make()
            about[name] = {"provider": deploy.provider_for(where)}
        except deploy.NotDeployable as exc:
            about[name] = {"error": str(exc)}
    about["onnxruntime"]["max_abs_diff"] = max_diff
    return sessions, about


def int8_accuracy(student: nn.Module, data, calibration_size: int, architecture: Hashable | None = None
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metrics, predictions by split) of ``student`` exported and quantized to int8 (``kdbench.deploy``), its
    calibration drawn from ``data.train``, run on one ONNX Runtime thread (deterministic): test and validation
    top-1 after quantization and the fp32 export's largest difference from eager. A student that cannot be
    deployed gets ``deployment_error`` instead. ``architecture``: as ``deploy.export``'s."""
    check = data.test.sample(CHECK_INPUTS)
    try:
        exported, max_diff = deploy.export_checked(student, check, architecture=architecture)
        int8 = deploy.session(deploy.quantize(exported, deploy.calibration_inputs(data.train, calibration_size)), 1)
    except deploy.NotDeployable as exc:
        return {"deployment_error": str(exc)}, {}
    preds = {"test": deploy.predict_session(int8, data.test), "val": deploy.predict_session(int8, data.val)}
    return {"onnx_max_abs_diff": max_diff, "int8_test_top1": top1(preds["test"], data.test.y),
            "int8_val_top1": top1(preds["val"], data.val.y)}, preds
