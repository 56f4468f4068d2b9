import torch
from torch import nn

from kdbench.metrics import (
    MIN_ROUNDS,
    cost_metrics,
    flops_per_sample,
    forward_times,
    top1,
)
from kdbench.tracks import load_track


def test_mnist1d_splits():
    data = load_track("mnist1d")
    assert (len(data.train), len(data.val), len(data.test)) == (10_000, 2_000, 10_000)
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
    from kdbench.taps import probe_shapes
    from kdbench.models import create_model

    data = load_track("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1077, 360, 360)
    assert data.in_shape == (1, 8, 8) and 0 <= data.train.x.min() and data.train.x.max() <= 1
    assert torch.bincount(data.test.y).min() >= 35  # stratified: ~36 per class
    shapes = probe_shapes(create_model("cnn2d_w4"), ["stage:0", "stage:1", "stage:2"], data.train.x)
    assert shapes == {"logits": (10,), "stage:0": (4, 8, 8), "stage:1": (4, 4, 4), "stage:2": (4, 2, 2)}


def test_mnist1d_augmentation_is_the_generators_shift_and_scale_by_hand():
    from kdbench.tracks.small import MNIST1D_MAX_SHIFT, MNIST1D_SCALE, augment_mnist1d

    x = torch.arange(2 * 40, dtype=torch.float32).view(2, 1, 40)
    out = augment_mnist1d(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    shift = torch.randint(0, MNIST1D_MAX_SHIFT + 1, (2, 1, 1), generator=g).flatten().tolist()
    scale = (1 + MNIST1D_SCALE * (torch.rand(2, 1, 1, generator=g) - 0.5)).flatten().tolist()
    for i in range(2):
        expected = torch.roll(x[i, 0], shift[i]) * scale[i]  # circular, as mnist1d.transform.translate
        assert torch.allclose(out[i, 0], expected)
    assert torch.equal(augment_mnist1d(x, torch.Generator().manual_seed(5)), out)  # seeded
    assert load_track("mnist1d").train.augment is augment_mnist1d


def test_digits_folds_test_every_image_once_per_repetition_and_never_train_on_it():
    from kdbench.tracks import sample_ids

    data = load_track("digits")
    for repetition in (0, 3):
        tested = []
        for fold in range(5):
            split = data.for_seed(5 * repetition + fold)
            train, val, test = (set(sample_ids(s).tolist()) for s in (split.train, split.val, split.test))
            assert not (train & test) and not (val & test) and not (train & val)
            assert len(train | val | test) == 1797
            assert split.description["repetition"] == repetition and split.description["fold"] == fold
            tested += sorted(test)
        assert sorted(tested) == list(range(1797))
    assert sample_ids(data.for_seed(0).test).tolist() != sample_ids(data.for_seed(5).test).tolist()
    assert "fold" not in data.description  # the run's config names the scheme, the same for every seed
