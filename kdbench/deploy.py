"""Deployment: a model exported to ONNX, run in ONNX Runtime, and quantized to int8 after training.

- **Export**: ``torch.onnx.export`` (the ``torch.export``-based exporter) of the model in eval mode, with a dynamic
  batch axis, from the CPU (a model on a GPU is copied there; its training mode comes back afterwards). A caller
  that names the model's architecture (``export(..., architecture=key)``, a benchmark run's student) has its graph
  traced once per key in the process; each model of that key then gets its own weights in a copy of it
  (``ONNXProgram.apply_weights``) before the exporter's optimisation: the same optimised graph, weights and
  outputs as a full export, in about 30 ms instead of 0.8 s for the CPU tier's students.
- **Check**: the exported model must give the eager model's outputs on real inputs within
  ``ATOL + RTOL · max|eager|`` (``check_outputs``); the largest difference is recorded.
- **Runtime**: ONNX Runtime with the CPU execution provider (the CUDA one for a model on a GPU, where
  onnxruntime-gpu provides it), a fixed number of intra-op threads, one inter-op thread, graph optimisations at
  ONNX Runtime's default (all).
- **int8**: ONNX Runtime's static post-training quantization, its recommended recipe: ``quant_pre_process`` (shape
  inference and graph optimisation), then ``quantize_static``: QDQ format, int8 weights per
  output channel and int8 activations (S8S8, ONNX Runtime's recommended first choice on CPU), MinMax calibration
  on ``calibration`` samples of the training split (a fixed draw, ``calibration_inputs``), transformed as for
  evaluation. Quantized models run on the CPU execution provider. Where that provider's int8 kernels saturate
  (x86 CPUs without VNNI multiply u8 × s8 pairs with VPMADDUBSW, whose 16-bit sums clip; ``int8_saturates``
  measures it), weights are quantized to 7 bits (``reduce_range``), as ONNX Runtime's quantization guide advises
  for those CPUs: clipped sums would report an accuracy the quantized model does not have. Records say which
  (``env.int8_weight_bits``).

A model that does not export, differs from eager, or does not quantize raises ``NotDeployable`` with one line
saying why; callers record that line, never a silent gap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import model_device

ATOL = 1e-5  # the exported model's outputs agree with eager within ATOL + RTOL · max|eager output|
RTOL = 1e-5
INPUT = "x"
CALIBRATION_BATCH = 32
CALIBRATION_SEED = 0  # the calibration samples are a fixed draw from the training split


class NotDeployable(KdbenchError):
    """The model could not be exported, differs from eager after export, or could not be quantized."""


def export(model: nn.Module, sample: torch.Tensor, architecture: Hashable | None = None) -> bytes:
    """The ONNX model (serialized) of ``model`` in eval mode, its batch axis dynamic; ``sample``: at least two
    real inputs (a batch of one would fix the axis). ``architecture``: a key that fixes the model's structure
    (every model given the same key must differ from the others in its weights alone, as a registry name with
    its number of classes does); its graph is then traced once (``_TRACED``) and reused with this model's
    weights."""
    x = sample[:2].cpu()
    if len(x) < 2:
        x = torch.cat([x, x])
    was = model.training
    try:
        cpu = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
        with _quiet():
            if architecture is None:
                return _traced(cpu.eval(), x, optimize=True).model_proto.SerializeToString()
            key = (architecture, tuple(x.shape[1:]), x.dtype)
            if key not in _TRACED:
                _TRACED[key] = _traced(cpu.eval(), x, optimize=False).model_proto.SerializeToString()
                while len(_TRACED) > TRACED_KEPT:
                    _TRACED.pop(next(iter(_TRACED)))
            program = torch.onnx.ONNXProgram(ir.from_proto(onnx.load_from_string(_TRACED[key])), None)
            program.apply_weights({name: value.detach() for name, value in cpu.state_dict().items()})
            program.optimize()  # what torch.onnx.export(optimize=True) runs after tracing
            return program.model_proto.SerializeToString()
    except Exception as exc:  # the exporter raises many kinds; the reason is recorded, not hidden
        raise NotDeployable(f"torch.onnx.export failed: {_first_line(exc)}") from None
    finally:
        model.train(was)


TRACED_KEPT = 4  # architectures whose traced graph a process keeps (each holds a copy of one model's weights)
_TRACED: dict[Hashable, bytes] = {}


def _traced(model: nn.Module, x: torch.Tensor, optimize: bool) -> torch.onnx.ONNXProgram:
    return torch.onnx.export(model, (x,), input_names=[INPUT], output_names=["logits"], dynamo=True,
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, optimize=optimize)


def session(model_bytes: bytes, threads: int, device: str | torch.device = "cpu", spin: bool = False
            ) -> ort.InferenceSession:
    """An ONNX Runtime session with ``threads`` intra-op threads, on the execution provider for ``device``.

    Its threads do not spin (``spin`` gives ONNX Runtime's default, for the benchmark that compares the two): a
    spinning thread keeps its core busy after each call, and the models that are timed side by side with it
    (eager PyTorch, the other sessions) would be timed on a busy machine."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    provider = provider_for(device)
    try:
        return ort.InferenceSession(model_bytes, options, providers=[provider])
    except Exception as exc:
        raise NotDeployable(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None


def provider_for(device: str | torch.device) -> str:
    """ONNX Runtime's execution provider for a torch device; a GPU without onnxruntime-gpu is a clear error."""
    if torch.device(device).type != "cuda":
        return "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise NotDeployable("this onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu to time "
                            "models on the GPU in ONNX Runtime")
    return "CUDAExecutionProvider"


def run(sess: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """The session's output (logits) for inputs ``x``."""
    return torch.from_numpy(sess.run(None, {INPUT: x.cpu().numpy()})[0])


def check_outputs(model: nn.Module, sess: ort.InferenceSession, x: torch.Tensor) -> float:
    """The largest absolute difference between the session's and the eager model's outputs on ``x`` (eager on the
    CPU); raises ``NotDeployable`` beyond the tolerance."""
    reference = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()  # no TF32 on the CPU
    was = reference.training
    with torch.inference_mode():
        eager = reference.eval()(x.cpu()).float()
    reference.train(was)
    exported = run(sess, x).float()
    if exported.shape != eager.shape:
        raise NotDeployable(f"the ONNX model returns shape {tuple(exported.shape)}, eager {tuple(eager.shape)}")
    diff = float((exported - eager).abs().max())
    tolerance = ATOL + RTOL * float(eager.abs().max())
    if not diff <= tolerance:  # NaN fails too
        raise NotDeployable(f"the ONNX model's outputs differ from eager by {diff:.3g} (tolerance {tolerance:.3g})")
    return diff


def export_checked(model: nn.Module, inputs: torch.Tensor, threads: int = 1,
                   architecture: Hashable | None = None) -> tuple[bytes, float]:
    """(the ONNX export of ``model``, its largest difference from eager on ``inputs``): ``export`` then
    ``check_outputs`` on a CPU session with ``threads``; raises ``NotDeployable`` where either refuses."""
    exported = export(model, inputs, architecture)
    return exported, check_outputs(model, session(exported, threads), inputs)


def calibration_inputs(split, n: int) -> torch.Tensor:
    """``n`` inputs of the training split (all if it has fewer), a fixed draw, transformed as for evaluation."""
    n = min(n, len(split))
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:n]
    return split.subset(chosen.sort().values).sample(n)


def quantize(model_bytes: bytes, calibration: torch.Tensor) -> bytes:
    """The model quantized to int8 (``INT8``), calibrated on ``calibration`` inputs."""
    with tempfile.TemporaryDirectory() as folder, _quiet():
        fp32, prepared, int8 = (Path(folder) / f"{name}.onnx" for name in ("fp32", "prepared", "int8"))
        fp32.write_bytes(model_bytes)
        try:
            quant_pre_process(fp32, prepared)
            quantize_static(prepared, int8, _Batches(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            reduce_range=int8_weight_bits() == 7)
        except Exception as exc:
            raise NotDeployable(f"int8 quantization failed: {_first_line(exc)}") from None
        return int8.read_bytes()


def predict_session(sess: ort.InferenceSession, split) -> torch.Tensor:
    """Top-1 predicted class of every sample of ``split``, in order."""
    return torch.cat([run(sess, x).argmax(1) for x, _ in split.batches(split.eval_batch)])


@functools.cache
def int8_saturates() -> bool:
    """Whether this machine's ONNX Runtime CPU kernels clip int8 products: a MatMulInteger of 64 products
    255 × 127 comes out exact (2,072,640) with VNNI, on ARM and in the reference kernels, but pairwise clipped to
    16 bits (1,048,544) where x86 kernels use VPMADDUBSW. Measured rather than read from CPU flags, so that it holds
    for whatever kernels this runtime picks."""
    a, b = np.full((1, 64), 255, np.uint8), np.full((64, 1), 127, np.int8)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_saturation",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, list(a.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 1])],
        [onnx.numpy_helper.from_array(b, "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    (y,) = session(model.SerializeToString(), threads=1).run(None, {"a": a})
    return int(y[0, 0]) != int((a.astype(np.int64) @ b.astype(np.int64))[0, 0])


def int8_weight_bits() -> int:
    """The width ``quantize`` gives int8 weights here: 7 where the kernels would clip 8-bit ones."""
    return 7 if int8_saturates() else 8


def versions() -> dict:
    """The runtime's and the exporter's versions and the int8 weights' width, for records and the leaderboard's
    protocol."""
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "int8_weight_bits": int8_weight_bits()}


class _Batches(CalibrationDataReader):
    def __init__(self, x: torch.Tensor):
        self._batches = iter([{INPUT: x[i:i + CALIBRATION_BATCH].cpu().numpy()}
                              for i in range(0, len(x), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet():
    """The exporter and the quantizer print progress and warnings (the quantizer on the root logger); a benchmark
    run's log stays readable."""
    loggers = [logging.getLogger(name) for name in ("", "onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The root cause's first line (the exporter wraps it in pages of advice), without terminal colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
