import torch
from torch import nn

from kdbench.measure import (
    MIN_ROUNDS,
    cost_metrics,
    flops_per_sample,
    forward_times,
    top1,
)
from kdbench.tracks import load_track


def test_mnist1d_splits():
    data = load_track("mnist1d")
    assert (len(data.train), len(data.val), len(data.test)) == (3600, 400, 1000)
    assert data.train.x.shape[1:] == (1, 40) and data.in_shape == (1, 40)
    # stratified: each class's share of val is its share of train, to within one sample
    expected = torch.bincount(data.train.y) * len(data.val) / len(data.train)
    assert (torch.bincount(data.val.y) - expected).abs().max() <= 1
    again = load_track("mnist1d")
    assert torch.equal(again.val.x, data.val.x)  # fixed split


def test_flops_of_linear_layer():
    assert flops_per_sample(nn.Linear(40, 10), torch.zeros(1, 40)) == 2 * 40 * 10


def test_cost_metrics_fields():
    small, big = cost_metrics([nn.Linear(40, 10), nn.Linear(40, 100)], torch.zeros(1, 40), threads=1,
                              throughput_batch=8, min_run_time=0.01)
    assert (small["params"], small["flops"], big["params"], big["flops"]) == (410, 800, 4100, 8000)
    for m in (small, big):
        assert m["latency_b1_ms"] > 0 and m["latency_b1_iqr_ms"] >= 0 and m["throughput_bN"] > 0
        assert m["throughput_batch"] == 8


class _Logged(nn.Module):
    """Appends its name to ``calls`` at every forward pass."""

    def __init__(self, name: str, calls: list):
        super().__init__()
        self.name, self.calls, self.linear = name, calls, nn.Linear(4, 2)

    def forward(self, x):
        self.calls.append(self.name)
        return self.linear(x)


def test_models_are_timed_in_alternating_blocks():
    """Side by side, not one after the other: after each model's warm-up, the timed passes switch between the
    models block by block, every model getting MIN_ROUNDS blocks at least, each of the size its warm-up chose."""
    calls = []
    models = [_Logged("student", calls), _Logged("teacher", calls)]
    forward_times(models, torch.zeros(1, 4), 1, threads=1, min_run_time=0.0)
    switches = [i for i in range(1, len(calls)) if calls[i] != calls[i - 1]]
    # the student's warm-up, the teacher's, then R ≥ MIN_ROUNDS rounds of (student, teacher): 2R + 1 switches
    assert len(switches) >= 2 * MIN_ROUNDS + 1
    assert calls[0] == "student" and calls[-1] == "teacher"
    assert not any(m.training for m in models)


def test_top1():
    assert top1(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 50.0


def test_digits_splits_and_2d_models():
    from kdbench.features import probe_shapes
    from kdbench.models import create_model

    data = load_track("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1077, 360, 360)
    assert data.in_shape == (1, 8, 8) and 0 <= data.train.x.min() and data.train.x.max() <= 1
    assert torch.bincount(data.test.y).min() >= 35  # stratified: ~36 per class
    shapes = probe_shapes(create_model("cnn2d_w4"), ["stage:0", "stage:1", "stage:2"], data.train.x)
    assert shapes == {"logits": (10,), "stage:0": (4, 8, 8), "stage:1": (4, 4, 4), "stage:2": (4, 2, 2)}
