"""The Python API on models of the user's own making (no ``stages``), timm and transformers models."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdbench
from kdbench.errors import KdbenchError
from kdbench.models import count_params
from kdbench.tracks.custom import as_split, hold_out

FAST = {"threads": 1, "throughput_batch": 8, "min_run_time": 0.01, "deployment": False}
ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Someone else's MLP: no ``stages`` attribute, modules named ``body.<i>`` and ``head``."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x))


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 8-D (fixed centres), ``n`` samples drawn with ``seed``."""
    centres = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.arange(n) % 3
    return centres[y] + torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), y


@pytest.fixture(scope="module")
def data():
    return blobs(240, seed=1)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    net = Net(64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(net(data[0]), data[1]).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture
def student():
    torch.manual_seed(1)
    return Net(8)


def distill(teacher, student, data, **kwargs):
    kwargs = {"epochs": 3, "batch_size": 32, "lr": 1e-2, "log": False, "timing": FAST} | kwargs
    return kdbench.distill(teacher, student, data, **kwargs)


def test_vanilla_kd_on_tensors_reports_on_the_held_out_validation_split(teacher, student, data):
    trained, report = distill(teacher, student, data, epochs=8)
    assert trained is student and not student.training
    assert report.method == "vanilla_kd" and report.split == "validation" and not report.logged
    assert [row["epoch"] for row in report.history] == list(range(1, 9))
    assert {"train_ce", "train_kd", "train_loss", "val_top1"} <= set(report.history[-1])
    assert (report.student_params, report.teacher_params, report.extra_params) == (
        count_params(student), count_params(teacher), 0)
    assert 0 < report.student_flops < report.teacher_flops
    assert report.student_latency_ms > 0 and report.teacher_latency_ms > 0 and report.train_seconds > 0
    assert report.student_throughput > 0 and report.teacher_throughput > 0 and report.throughput_batch == 8
    _, val, how = hold_out(as_split(data, "data", torch.float32))  # the documented split: stratified 10 %
    assert how.startswith("stratified 10 %") and len(val) == 24 and val.y.bincount().tolist() == [8, 8, 8]
    assert (report.student_top1, report.agreement) == kdbench.evaluate(student, (val.x, val.y), teacher=teacher)
    assert report.teacher_top1 == kdbench.evaluate(teacher, (val.x, val.y))
    assert report.student_top1 > 80  # easy blobs: the student learns (chance is 33 %)
    summary = report.summary()
    assert f"retains {100 * report.student_top1 / report.teacher_top1:.1f} % of the teacher's accuracy" in summary
    assert f"{report.teacher_params / report.student_params:.1f}× fewer parameters" in summary


def test_summary_says_which_way_each_ratio_goes(teacher, student, data):
    _, report = distill(teacher, student, data, epochs=1)
    slower = dataclasses.replace(report, teacher_top1=80.0, student_top1=72.0, student_latency_ms=2.0,
                                 teacher_latency_ms=1.0)
    assert "retains 90.0 % of the teacher's accuracy" in slower.summary()
    assert "2.0× higher latency" in slower.summary()


def test_fitnets_with_module_names_leaves_the_models_as_they_were(teacher, student, data):
    teacher.train()
    try:
        _, report = distill(teacher, student, data, method="fitnets", epochs=2, hint_weight=1.0,
                            student_stages=["body.1", "body.3"], teacher_stages=["body.1", "body.3"])
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    finally:
        teacher.eval()
    assert report.extra_params == 8 * 64 + 64  # stage -2 (body.1): a Linear 8 → 64 regressor, not in the student
    assert report.student_params == count_params(student)
    assert all(row["train_hint"] > 0 for row in report.history)
    assert not hasattr(student, "stages") and not hasattr(teacher, "stages")
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_module_names_are_checked(teacher, student, data):
    with pytest.raises(KdbenchError, match=r"student_stages: Net has no module 'body\.9'; close names: .*body\.1"):
        distill(teacher, student, data, method="fitnets", student_stages=["body.1", "body.9"],
                teacher_stages=["body.1", "body.3"])
    with pytest.raises(KdbenchError, match=r"fitnets reads stage:-2 of the teacher: pass teacher_stages=.*body, head"):
        distill(teacher, student, data, method="fitnets", student_stages=["body.1", "body.3"])


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "method vanilla_kd: temperature: Input should be greater than 0 (got -1)"),
    ({"temprature": 4}, "method vanilla_kd: temprature: Extra inputs are not permitted"),
    ({"epochs": 0}, "training settings: epochs: Input should be greater than 0"),
    ({"optimizer": "adam"}, "training settings: optimizer: Input should be 'adamw' or 'sgd'"),
    ({"method": "vanila_kd"}, "unknown method 'vanila_kd'; did you mean: vanilla_kd"),
    ({"timing": {"thread": 1}}, "timing: thread: Extra inputs are not permitted"),
    ({"device": "gpu0"}, "device 'gpu0' is not a torch device"),
    ({"batch_size": 500}, "batch_size 500 exceeds the 216 training samples"),
])
def test_bad_input_is_one_line(teacher, student, data, kwargs, message):
    with pytest.raises(KdbenchError) as error:
        distill(teacher, student, data, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_data_is_one_line(teacher, student, data):
    with pytest.raises(KdbenchError, match="data: expected an"):
        distill(teacher, student, data[0])
    with pytest.raises(KdbenchError, match="y must be a 1-D tensor of integer class labels"):
        distill(teacher, student, (data[0], data[1].float()))
    with pytest.raises(KdbenchError, match=r"labels go up to 3 but the models' logits have shape \(3,\)"):
        distill(teacher, student, (data[0], data[1] + 1))
    with pytest.raises(KdbenchError, match=r"the student \(Dict\) returns dict: its forward must return logits"):
        distill(teacher, Dict(), data)


class Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return {"scores": self.linear(x)}


def test_few_samples_make_one_batch_by_default(teacher, student):
    _, report = distill(teacher, student, blobs(30, seed=4), batch_size=None, epochs=2)
    assert len(report.history) == 2 and report.split == "validation"


def test_same_seed_same_accuracy(teacher, student, data):
    runs = [distill(teacher, copy.deepcopy(student), data, seed=seed) for seed in (3, 3, 4)]
    (a, first), (b, again), (_, other) = runs
    assert first.student_top1 == again.student_top1 and first.history == again.history
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert other.history != first.history


def test_test_data_is_what_the_report_measures(teacher, student, data):
    test = blobs(90, seed=2)
    _, report = distill(teacher, student, data, test_data=test, val_data=blobs(30, seed=3))
    assert report.split == "test"
    assert (report.student_top1, report.agreement) == kdbench.evaluate(student, test, teacher=teacher)
    assert report.teacher_top1 == kdbench.evaluate(teacher, test)


def test_evaluate_and_measure(teacher, data):
    x, y = data
    expected = 100 * (teacher(x).argmax(1) == y).double().mean().item()
    assert kdbench.evaluate(teacher, data) == expected
    assert kdbench.evaluate(teacher, data, teacher=teacher) == (expected, 100.0)
    cost = kdbench.measure(nn.Linear(8, 3), x[:5], **FAST)
    assert cost["params"] == 27 and cost["flops"] == 2 * 8 * 3  # the first input only: FLOPs per sample
    assert cost["latency_b1_ms"] > 0 and cost["throughput_bN"] > 0 and cost["throughput_batch"] == 8
    with pytest.raises(KdbenchError, match="timing: thread: Extra inputs are not permitted"):
        kdbench.measure(teacher, x, thread=1)


def test_deployment_times_onnx_runtime_tests_int8_and_exports_the_student(teacher, student, data, tmp_path):
    import onnxruntime as ort
    from safetensors.torch import load_model

    timing = FAST | {"deployment": True, "int8_calibration": 32}
    trained, report = distill(teacher, student, data, epochs=4, timing=timing, export=tmp_path / "out")
    assert report.deployment_error is None
    assert report.student_onnx_latency_ms > 0 and report.teacher_onnx_latency_ms > 0
    assert report.student_int8_latency_ms > 0 and abs(report.student_int8_top1 - report.student_top1) <= 10
    assert "in ONNX Runtime" in report.summary() and "after int8 quantization" in report.summary()
    assert report.int8_weight_bits == (7 if kdbench.deploy.int8_saturates() else 8)
    assert ("7-bit weights: this CPU's int8 kernels would clip 8-bit ones" in report.summary()) == \
        (report.int8_weight_bits == 7)
    assert set(report.files) == {"safetensors", "onnx"}
    reloaded = Net(8)
    load_model(reloaded, report.files["safetensors"])
    x = data[0][:16]
    session = ort.InferenceSession(report.files["onnx"], providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained(x))
        torch.testing.assert_close(torch.from_numpy(onnx_logits), trained(x), atol=1e-5, rtol=1e-5)
    cost = kdbench.measure(trained, x, **timing)
    assert cost["onnxruntime"]["latency_b1_ms"] > 0 and cost["onnxruntime"]["max_abs_diff"] < 1e-4
    assert cost["onnxruntime_int8"]["latency_b1_ms"] > 0 and "error" not in cost["onnxruntime_int8"]


def test_dataloader_batches_its_own_way(teacher, student, data):
    loader = lambda: DataLoader(TensorDataset(*data), batch_size=24, shuffle=True)
    runs = [distill(teacher, copy.deepcopy(student), loader(), batch_size=None, epochs=2) for _ in range(2)]
    assert runs[0][1].split == "validation" and runs[0][1].history == runs[1][1].history
    assert kdbench.evaluate(runs[0][0], loader()) == kdbench.evaluate(runs[0][0], data)  # in order, shuffled or not
    with pytest.raises(KdbenchError, match="batch_size 16: the DataLoader batches by itself"):
        distill(teacher, student, loader(), batch_size=16)


def test_timm_model_as_it_is():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher, student = (timm.create_model("test_resnet", num_classes=3) for _ in range(2))
    x, y = torch.randn(24, 3, 16, 16), torch.arange(24) % 3
    _, report = distill(teacher, student, (x, y), method="fitnets", epochs=1, batch_size=12,
                        student_stages=["layer1", "layer2"], teacher_stages=["layer1", "layer2"])
    assert report.extra_params > 0 and report.student_params == count_params(student)


def test_transformers_model_output_is_read_through_logits():
    from transformers import BertConfig, BertForSequenceClassification

    def bert(layers):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=2)
        return BertForSequenceClassification(config)

    input_ids = torch.randint(1, 30, (60, 8), generator=torch.Generator().manual_seed(0))
    labels = (input_ids[:, 0] >= 15).long()
    teacher, student = bert(2), bert(1)
    trained, report = distill(teacher, student, (input_ids, labels), epochs=1, batch_size=16)
    assert trained is student and 0 < report.student_params < report.teacher_params
    assert 0 < report.student_flops < report.teacher_flops
    assert isinstance(kdbench.evaluate(student, (input_ids, labels)), float)


def test_the_run_is_logged_to_mlflow_unless_log_false(teacher, student, data):
    from kdbench.tracking import _mlflow

    def runs():
        mlflow = _mlflow()
        found = mlflow.search_runs(search_all_experiments=True, filter_string="params.seed = '11'",
                                   output_format="list")
        return [(run, mlflow.get_experiment(run.info.experiment_id).name) for run in found]

    _, report = distill(teacher, copy.deepcopy(student), data, seed=11, log=False)
    assert not report.logged and runs() == []
    _, report = distill(teacher, student, data, seed=11, log=True)
    assert report.logged
    ((run, experiment),) = runs()
    assert experiment == "kdbench-api"
    assert run.data.tags["track"] == "custom" and run.data.tags["status"] == "finished"
    assert run.data.params["method"] == "vanilla_kd" and run.data.params["student"] == "Net"
    assert run.data.metrics["test_top1"] == report.student_top1
    assert run.data.metrics["teacher_params"] == report.teacher_params


def test_measure_is_the_function_whatever_was_imported():
    # the metrics submodule has its own name, so no submodule import can bind over the API function
    importlib.import_module("kdbench.metrics")
    assert kdbench.measure is kdbench.api.measure and callable(kdbench.measure)
    light = "import sys, kdbench; assert 'torch' not in sys.modules, 'import kdbench imported torch'"
    done = subprocess.run([sys.executable, "-c", light], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the command line starts without torch


@pytest.mark.slow
def test_example_runs_in_under_a_minute():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "examples/distill_digits.py"], check=False, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("retains") == 2
    assert time.perf_counter() - start < 60
