import math

import pytest
import torch

from kdbench.config import TrainConfig
from kdbench.losses import summed
from kdbench.method import SupervisedOnly, MethodConfig
from kdbench.models import create_model
from kdbench.tracks import Split, TrackData
from kdbench.train import DivergedError, fit


def tiny_data(n=32):
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))
    return TrackData(split, split, split, num_classes=10, in_shape=(1, 40))


class Exploding(SupervisedOnly):
    def loss(self, student, teacher, target, progress):
        return {"ce": super().loss(student, teacher, target, progress)["ce"] * float("nan")}


def test_nan_loss_stops_the_run_with_its_step():
    with pytest.raises(DivergedError, match="loss at epoch 1, step 0 is nan"):
        fit(create_model("cnn1d_w4"), Exploding(MethodConfig(), {}, {}), None, tiny_data(), TrainConfig(epochs=1, batch_size=8, lr=0.01), 0)


def test_history_has_one_row_per_epoch():
    history = fit(create_model("cnn1d_w4"), SupervisedOnly(MethodConfig(), {}, {}), None, tiny_data(),
                  TrainConfig(epochs=2, batch_size=8, lr=0.01), 0)
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_ce", "train_loss", "val_top1"} <= set(history[0])


def test_batch_larger_than_data_is_refused():
    from kdbench.errors import KdbenchError

    with pytest.raises(KdbenchError, match="batch_size 64 exceeds the 32 training samples"):
        fit(create_model("cnn1d_w4"), SupervisedOnly(MethodConfig(), {}, {}), None, tiny_data(),
            TrainConfig(epochs=1, batch_size=64, lr=0.01), 0)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from kdbench.errors import KdbenchError

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01)
    method = lambda: SupervisedOnly(MethodConfig(), {}, {})  # noqa: E731

    def student():
        torch.manual_seed(0)
        return create_model("cnn1d_w4")

    uninterrupted = student()
    expected = fit(uninterrupted, method(), None, tiny_data(), cfg, seed=3)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(student(), method(), None, tiny_data(), cfg, seed=3, on_epoch=stop_after_two, checkpoint=checkpoint)
    resumed = student()  # a fresh process would rebuild the model from scratch
    history = fit(resumed, method(), None, tiny_data(), cfg, seed=3, checkpoint=checkpoint)
    assert history == expected
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(KdbenchError, match="is not a plain training-state file"):
        fit(student(), method(), None, tiny_data(), cfg, seed=3, checkpoint=checkpoint)


def test_opt_in_speed_modes_are_left_out_of_a_default_config():
    """Off, they are not written: configs (and so record and teacher-cache hashes) of older runs stay valid."""
    default = TrainConfig(epochs=1, batch_size=8, lr=0.01)
    assert "precision" not in default.model_dump(mode="json")
    assert "channels_last" not in default.model_dump(mode="json")
    assert "compile" not in default.model_dump(mode="json")
    on = default.model_copy(update={"precision": "bf16", "channels_last": True, "compile": "default"})
    assert on.model_dump(mode="json") | {} == {**default.model_dump(mode="json"), "precision": "bf16",
                                              "channels_last": True, "compile": "default"}
    assert TrainConfig(**on.model_dump(mode="json")) == on


def _vanilla_kd(student, teacher, data, cfg):
    from kdbench.method import METHODS
    from kdbench.taps import probe_shapes
    from kdbench.sources import construct

    cls = METHODS.get("vanilla_kd")
    s_taps, t_taps = cls.taps(cls.Config())
    x = data.train.x[:2]
    method = construct(cls, cls.Config(), probe_shapes(student, s_taps, x, len(data.train)),
                       probe_shapes(teacher, t_taps, x, len(data.train)), None)
    return fit(student, method, teacher, data, cfg, seed=0)


def _pair(name):
    torch.manual_seed(0)
    return create_model(f"{name}_w8"), create_model(f"{name}_w4")


def test_bf16_trains_in_fp32_weights_with_a_different_result():
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    teacher, student = _pair("cnn1d")
    fp32 = _vanilla_kd(student, teacher, tiny_data(), cfg)
    teacher, student_bf16 = _pair("cnn1d")
    bf16 = _vanilla_kd(student_bf16, teacher, tiny_data(), cfg.model_copy(update={"precision": "bf16"}))
    assert all(p.dtype == torch.float32 for p in student_bf16.parameters())
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in bf16)
    assert bf16[-1]["train_loss"] != fp32[-1]["train_loss"]  # autocast did run
    assert abs(bf16[-1]["train_loss"] - fp32[-1]["train_loss"]) < 0.25 * fp32[-1]["train_loss"]  # same training


def tiny_images(n=32):
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return TrackData(split, split, split, num_classes=10, in_shape=(1, 8, 8))


def test_channels_last_trains_the_same_model_up_to_rounding():
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    teacher, student = _pair("cnn2d")
    _vanilla_kd(student, teacher, tiny_images(), cfg)
    teacher, student_cl = _pair("cnn2d")
    _vanilla_kd(student_cl, teacher, tiny_images(), cfg.model_copy(update={"channels_last": True}))
    conv = student_cl.blocks[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for name, value in student.state_dict().items():
        torch.testing.assert_close(student_cl.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_compile_trains_the_same_model_up_to_rounding_and_the_same_way_twice():
    """torch.compile of the step (teacher forward, student forward and loss): SGD here, whose updates, unlike
    AdamW's, do not magnify a rounding difference in a near-zero gradient; "reduce-overhead" adds CUDA graphs, which
    a CPU run skips, so it trains as "default" does."""
    from torch._dynamo.utils import counters

    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="sgd")
    weights = {}
    for name, mode in (("eager", "none"), ("compiled", "default"), ("again", "default"),
                       ("reduce-overhead", "reduce-overhead")):
        teacher, student = _pair("cnn1d")
        graphs = counters["stats"]["unique_graphs"]
        history = _vanilla_kd(student, teacher, tiny_data(), cfg.model_copy(update={"compile": mode}))
        assert (counters["stats"]["unique_graphs"] > graphs) == (mode != "none"), name  # compiled exactly when asked
        assert all(math.isfinite(row["train_loss"]) for row in history)
        weights[name] = student.state_dict()
    for name, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][name], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(weights["again"][name], weights["compiled"][name]), name
        assert torch.equal(weights["reduce-overhead"][name], weights["compiled"][name]), name


def test_channels_last_refuses_a_track_without_images():
    from kdbench.errors import KdbenchError

    teacher, student = _pair("cnn1d")
    with pytest.raises(KdbenchError, match=r"channels_last needs image batches \(N, C, H, W\); this track's batches "
                                           r"have shape \(8, 1, 40\): set channels_last: false"):
        _vanilla_kd(student, teacher, tiny_data(), TrainConfig(epochs=1, batch_size=8, lr=0.01, channels_last=True))


def test_summed_is_sum_without_the_extra_zero_op():
    """The loop's total and the methods' sums over stages: sum()'s value and gradients, one add per extra term."""
    a, b, c = (torch.tensor(v, requires_grad=True) for v in (0.1, 0.2, 0.3))
    assert summed([a]) is a
    total = summed(t for t in (a, b, c))
    assert torch.equal(total, sum((a, b, c)))
    assert torch.equal(total, (a + b) + c)
    inner = total.grad_fn.next_functions[0][0]  # (a + b): its inputs are the leaves, not 0 + a
    assert all(f.variable is leaf for (f, _), leaf in zip(inner.next_functions, (a, b), strict=True))
    total.backward()
    assert [t.grad.item() for t in (a, b, c)] == [1.0, 1.0, 1.0]
