"""Deployment (kdbench.deploy): ONNX export checked against eager, ONNX Runtime timings, int8 accuracy, and the
leaderboard's deployment columns, on every CPU-tier architecture and one model of each GPU-tier family."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import TINY_SUITE, run_suite_once
from kdbench import deploy
from kdbench.config import MeasureConfig
from kdbench.leaderboard import render
from kdbench.metrics import RUNTIMES, cost_metrics, int8_accuracy
from kdbench.models import MODELS, create_model
from kdbench.records import load_records
from kdbench.timing import load_timing, timing_path
from kdbench.tracks import Split, TrackData, load_track

CPU_TIER = sorted(n for n in MODELS.names() if n.startswith(("cnn1d_", "cnn2d_")))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", CPU_TIER)
def test_every_cpu_tier_architecture_exports_matches_eager_and_quantizes(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(5, *MODELS.get(name).in_shape)
    exported, diff = deploy.export_checked(model, x)
    assert diff <= deploy.ATOL and model.training  # the model's mode comes back
    quantized = deploy.quantize(exported, torch.randn(40, *x.shape[1:]))
    assert deploy.run(deploy.session(quantized, 1), x).shape == (5, 10)
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load_from_string(quantized).graph.node)


def test_a_gpu_tier_model_of_each_family_exports(tmp_path):
    """The CRD zoo (resnet8), timm's resnet18 and the 6-layer BERT (a tiny one, in save_pretrained form)."""
    from test_sst2 import write_tiny_bert

    torch.manual_seed(0)
    write_tiny_bert(tmp_path / "pretrained" / "bert-base-uncased")
    tokens = torch.stack([torch.randint(5, 30, (3, 12)), torch.ones(3, 12, dtype=torch.long)], 1)
    tokens[0, 1, 8:] = 0  # padding
    cases = [(create_model("resnet8", 100, (3, 32, 32)), torch.randn(3, 3, 32, 32)),
             (create_model("resnet18", 10, (3, 32, 32)), torch.randn(3, 3, 32, 32)),
             (create_model("bert_base_6l", 2, (2, 12), tmp_path), tokens)]
    for model, x in cases:
        model.eval()
        exported, diff = deploy.export_checked(model, x)
        with torch.no_grad():
            eager = model(x)
        assert diff <= deploy.ATOL + deploy.RTOL * float(eager.abs().max())
        assert deploy.run(deploy.session(deploy.quantize(exported, x), 1), x).shape == eager.shape


def _canonical(model_bytes: bytes) -> tuple:
    """An ONNX model without its names and metadata: opsets, inputs and outputs, and each node's op, attributes and
    wiring, value names replaced by their order of first appearance; initializers by value."""
    proto = onnx.load_from_string(model_bytes)
    graph, ids = proto.graph, {}

    def id_of(name: str) -> int | None:
        return ids.setdefault(name, len(ids)) if name else None

    inits = [(id_of(t.name), onnx.numpy_helper.to_array(t).dtype.str, onnx.numpy_helper.to_array(t).tobytes())
             for t in graph.initializer]
    io = [(id_of(v.name), str(v.type)) for v in (*graph.input, *graph.output)]
    nodes = [(n.op_type, n.domain, [id_of(i) for i in n.input], [id_of(o) for o in n.output],
              sorted(str(a) for a in n.attribute)) for n in graph.node]
    return sorted(str(o) for o in proto.opset_import), io, sorted(inits), nodes


def _trained_like(name: str, seed: int, *shape) -> nn.Module:
    """A model of ``name`` whose weights and batch-norm statistics all differ from its initial ones."""
    torch.manual_seed(seed)
    model = create_model(name, *shape)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor + 0.1 * torch.rand_like(tensor))  # positive: variances stay variances
    return model.eval()


@pytest.mark.parametrize("name, shape, int8", [("cnn1d_w8", (10, (1, 40)), True), ("cnn2d_w16", (10, (1, 8, 8)), True),
                                              ("resnet8", (100, (3, 32, 32)), False), ("bert_base_6l", (2, (2, 12)), False)])
def test_a_named_architecture_is_traced_once_and_exports_as_a_full_export_does(name, shape, int8, tmp_path):
    """``export(..., architecture=key)`` gives a later model of the key the graph, weights and fp32 and int8
    outputs that a full export of it gives (names and metadata aside), not the first model's weights."""
    if name.startswith("bert"):
        from test_sst2 import write_tiny_bert

        write_tiny_bert(tmp_path / "pretrained" / "bert-base-uncased")
        shape = (*shape, tmp_path)
        x = torch.stack([torch.randint(5, 30, (6, 12)), torch.ones(6, 12, dtype=torch.long)], 1)
    else:
        x = torch.randn(6, *shape[1])
    first, later = _trained_like(name, 0, *shape), _trained_like(name, 1, *shape)
    full = deploy.export(later, x)
    deploy._TRACED.clear()
    deploy.export(first, x, architecture=(name, "test"))  # traced with the first model's weights
    reused = deploy.export(later, x, architecture=(name, "test"))
    assert len(deploy._TRACED) == 1 and reused != full  # the node names differ
    assert _canonical(reused) == _canonical(full)
    assert torch.equal(deploy.run(deploy.session(reused, 1), x), deploy.run(deploy.session(full, 1), x))
    with torch.no_grad():
        assert not torch.allclose(first(x), later(x))
    deploy.check_outputs(later, deploy.session(reused, 1), x)
    if int8:
        calibration = torch.randn(40, *shape[1])
        int8_reused, int8_full = (deploy.session(deploy.quantize(m, calibration), 1) for m in (reused, full))
        assert torch.equal(deploy.run(int8_reused, x), deploy.run(int8_full, x))


def test_the_traced_graphs_kept_are_bounded():
    deploy._TRACED.clear()
    x = torch.randn(2, 1, 40)
    for width in (4, 8, 12, 16, 24):
        deploy.export(create_model(f"cnn1d_w{width}"), x, architecture=width)
    assert list(deploy._TRACED) == [(w, (1, 40), torch.float32) for w in (8, 12, 16, 24)][-deploy.TRACED_KEPT:]


class _Branchy(nn.Module):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


class _Noisy(nn.Linear):
    """Random in every forward: an export cannot give eager's outputs."""

    def forward(self, x):
        return super().forward(x) + torch.rand(x.shape[0], self.out_features)


def test_a_model_that_does_not_export_gets_a_one_line_reason_not_a_gap():
    with pytest.raises(deploy.NotDeployable, match=r"^torch\.onnx\.export failed: \w+") as info:
        deploy.export(_Branchy(), torch.ones(2, 4))
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    (entry,) = cost_metrics([_Branchy()], torch.ones(2, 4), 1, 4, 0.01, calibration=torch.ones(8, 4))
    assert entry["latency_b1_ms"] > 0  # still timed eagerly
    assert all(entry[name]["error"].startswith("torch.onnx.export failed") for name in RUNTIMES)


def test_outputs_that_differ_from_eager_are_refused():
    model = _Noisy(4, 3)
    exported = deploy.export(model, torch.ones(2, 4))
    with pytest.raises(deploy.NotDeployable, match="outputs differ from eager by .* \\(tolerance"):
        deploy.check_outputs(model, deploy.session(exported, 1), torch.ones(6, 4))


def test_cost_metrics_time_every_runtime_side_by_side():
    torch.manual_seed(0)
    teacher, student = create_model("cnn1d_w16"), create_model("cnn1d_w4")
    x = torch.randn(8, 1, 40)
    t_cost, s_cost = cost_metrics([teacher, student], x, 1, 8, 0.01, calibration=torch.randn(32, 1, 40))
    for cost in (t_cost, s_cost):
        assert cost["onnxruntime"]["max_abs_diff"] <= deploy.ATOL
        for entry in (cost, cost["onnxruntime"], cost["onnxruntime_int8"]):
            assert entry["latency_b1_ms"] > 0 and entry["latency_b1_iqr_ms"] >= 0 and entry["throughput_bN"] > 0
        assert cost["onnxruntime_int8"]["provider"] == "CPUExecutionProvider"
    assert "onnxruntime" not in cost_metrics([student], x, 1, 8, 0.01)[0]  # deployment off: eager only


def test_sessions_do_not_spin_unless_asked():
    """A session's threads must not busy-wait after a call: the eager models and other sessions timed in the same
    rounds would be timed beside them (benchmarks/test_perf.py::test_timing_beside_onnx_runtime measures it)."""
    exported = deploy.export(create_model("cnn1d_w4"), torch.randn(2, 1, 40))
    spinning = "session.intra_op.allow_spinning"
    assert deploy.session(exported, 2).get_session_options().get_session_config_entry(spinning) == "0"
    assert deploy.session(exported, 2, spin=True).get_session_options().get_session_config_entry(spinning) == "1"


def _mlp_and_inputs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(256, 64)


def _int8_weights(quantized: bytes) -> np.ndarray:
    model = onnx.load_from_string(quantized)
    return np.concatenate([onnx.numpy_helper.to_array(t).ravel() for t in model.graph.initializer
                           if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2])


def test_int8_kernels_compute_what_the_quantized_graph_says():
    """The int8 accuracy is the quantized model's, not a kernel artefact: ONNX Runtime's optimised int8 kernels give
    the outputs of the same QDQ graph evaluated op by op in float (graph optimisations off). On an x86 CPU without
    VNNI, 8-bit weights would clip in VPMADDUBSW's 16-bit sums; there weights are quantized to 7 bits."""
    model, x = _mlp_and_inputs()
    quantized = deploy.quantize(deploy.export(model, x[:2]), x)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = torch.from_numpy(ort.InferenceSession(quantized, plain, providers=["CPUExecutionProvider"]).run(
        None, {deploy.INPUT: x.numpy()})[0])
    kernels = deploy.run(deploy.session(quantized, 1), x)
    torch.testing.assert_close(kernels, reference, rtol=0, atol=0.02 * float(reference.abs().max()))


@pytest.mark.parametrize("saturates, limit", [(True, 64), (False, 127)])
def test_weights_take_7_bits_only_where_int8_kernels_clip(monkeypatch, saturates, limit):
    monkeypatch.setattr(deploy, "int8_saturates", lambda: saturates)
    model, x = _mlp_and_inputs()
    weights = _int8_weights(deploy.quantize(deploy.export(model, x[:2]), x))
    assert np.abs(weights.astype(int)).max() == limit
    assert deploy.versions()["int8_weight_bits"] == (7 if saturates else 8)


def test_calibration_is_a_fixed_draw_from_the_training_split():
    split = Split(torch.arange(100.0).reshape(100, 1), torch.zeros(100, dtype=torch.long), transform=lambda x: 2 * x)
    first, again = deploy.calibration_inputs(split, 10), deploy.calibration_inputs(split, 10)
    assert torch.equal(first, again) and len(first) == 10 and len(set(first.flatten().tolist())) == 10
    assert set((first / 2).flatten().tolist()) <= set(range(100)) and not torch.equal(first / 2, torch.arange(10.0)[:, None])
    assert len(deploy.calibration_inputs(split, 500)) == 100  # at most the split


def test_int8_accuracy_of_a_trained_student_and_a_refusal():
    data = load_track("digits").for_seed(0)
    torch.manual_seed(0)
    model = create_model("cnn2d_w8")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y in data.train.batches(64, torch.Generator().manual_seed(0), train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    metrics, preds = int8_accuracy(model, data, 64)
    fp32 = 100 * (model.eval()(data.test.sample(len(data.test))).argmax(1) == data.test.y).double().mean().item()
    assert fp32 > 80 and abs(metrics["int8_test_top1"] - fp32) < 5  # int8 keeps a trained net's accuracy
    assert metrics["onnx_max_abs_diff"] <= deploy.ATOL + deploy.RTOL * 100
    assert metrics["int8_test_top1"] == 100 * (preds["test"] == data.test.y).double().mean().item()
    again, again_preds = int8_accuracy(model, data, 64)
    assert again == metrics and torch.equal(again_preds["test"], preds["test"])  # deterministic
    branchy = TrackData(*(Split(torch.ones(8, 4), torch.zeros(8, dtype=torch.long)) for _ in range(3)), 2, (4,))
    refused, none = int8_accuracy(_Branchy(), branchy, 4)
    assert set(refused) == {"deployment_error"} and none == {}


def test_deployment_is_left_out_of_the_config_when_off():
    assert MeasureConfig().model_dump() == {"threads": 2, "throughput_batch": 256, "min_run_time": 0.5}
    assert MeasureConfig(deployment=True, int8_calibration=64).model_dump()["int8_calibration"] == 64


DEPLOYED_SUITE = TINY_SUITE.replace("min_run_time: 0.01}", "min_run_time: 0.01, deployment: true, int8_calibration: 64}")


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory, session_home):
    assert DEPLOYED_SUITE != TINY_SUITE
    return run_suite_once(tmp_path_factory.mktemp("deployed"), DEPLOYED_SUITE, session_home, suite_file="tiny.yaml")


def test_records_timing_and_leaderboard_of_a_deployed_suite(deployed_run):
    records = [rec for _, rec in load_records(deployed_run / "results")]
    assert len(records) == 4
    for rec in records:
        assert rec.config["measure"]["deployment"] and rec.config["measure"]["int8_calibration"] == 64
        assert 0 < rec.metrics.int8_test_top1 <= 100 and rec.metrics.onnx_max_abs_diff <= deploy.ATOL
        assert "test_int8" in rec.predictions and rec.env.onnxruntime == ort.__version__
        assert rec.env.int8_weight_bits == (7 if deploy.int8_saturates() else 8)
    timing = load_timing(timing_path(deployed_run / "results", "tiny", "mnist1d", "cnn1d_w8", "cnn1d_w4"))
    assert timing["env"]["onnxruntime"] == ort.__version__
    for cost in (timing["student_cost"], timing["teacher_cost"]):
        assert cost["onnxruntime"]["latency_b1_ms"] > 0 and cost["onnxruntime_int8"]["latency_b1_ms"] > 0
    board = render(deployed_run / "results")
    int8 = "int8 (static, QDQ, 7-bit weights)" if deploy.int8_saturates() else "int8 (static, QDQ)"
    assert f"| ONNX Runtime {ort.__version__} fp32 " in board and f"| ONNX Runtime {ort.__version__} {int8} " in board
    header = next(line for line in board.splitlines() if line.startswith("| method"))
    assert "int8 top-1" in header and "int8 − fp32 [95 % CI]" in header
    baseline = next(line for line in board.splitlines() if line.startswith("| baseline"))
    mean = np.mean([r.metrics.int8_test_top1 for r in records if r.method == "baseline"])
    assert f"| {mean:.2f} " in baseline
    mlflow.set_tracking_uri(f"sqlite:///{deployed_run / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["metrics.int8_test_top1"].notna().all()


def test_the_deployed_columns_say_why_a_student_was_not_deployed(deployed_run, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(deployed_run / "results", results)
    for path in results.rglob("vanilla_kd/seed*.json"):
        record = json.loads(path.read_text())
        for key in ("int8_test_top1", "int8_val_top1", "onnx_max_abs_diff"):
            record["metrics"].pop(key)
        record["metrics"]["deployment_error"] = "torch.onnx.export failed: RuntimeError: boom"
        record["predictions"].pop("test_int8")
        path.write_text(json.dumps(record))
    row = next(line for line in render(results).splitlines() if line.startswith("| vanilla_kd"))
    assert "not deployed: torch.onnx.export failed: RuntimeError: boom" in row
