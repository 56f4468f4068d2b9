import pytest
import torch

from kdbench.config import TrainConfig
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
