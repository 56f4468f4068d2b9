import torch
from safetensors.torch import load_file

from kdbench.config import TrainConfig
from kdbench.tracks import load_track
from kdbench.teachers import load_or_train_teacher

CFG = TrainConfig(epochs=1, batch_size=400, lr=0.01)


def test_teacher_is_trained_once_and_reproducible(tmp_path, monkeypatch):
    data = load_track("mnist1d")
    monkeypatch.setenv("KDBENCH_HOME", str(tmp_path / "a"))
    first, key = load_or_train_teacher("mnist1d", data, "cnn1d_w4", CFG, seed=0)
    (path,) = (tmp_path / "a" / "teachers").glob("*.safetensors")
    assert key[:16] in path.name
    mtime = path.stat().st_mtime_ns
    again, _ = load_or_train_teacher("mnist1d", data, "cnn1d_w4", CFG, seed=0)
    assert path.stat().st_mtime_ns == mtime  # loaded from the cache, not retrained
    torch.rand(7)  # whatever the process did before must not change the teacher
    monkeypatch.setenv("KDBENCH_HOME", str(tmp_path / "b"))
    fresh, _ = load_or_train_teacher("mnist1d", data, "cnn1d_w4", CFG, seed=0)
    for name, value in load_file(str(path)).items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert not again.training


def test_teacher_key_depends_on_config_seed_and_data():
    """Anything that changes what the teacher learns changes its key (the cache's file name): the training
    schedule, the seed, the architecture and the data (a cross-validation fold); the same inputs, the same key."""
    from dataclasses import replace

    from kdbench.teachers import teacher_key

    data = load_track("mnist1d")
    base = teacher_key("mnist1d", data, "cnn1d_w4", CFG, 0)
    assert teacher_key("mnist1d", data, "cnn1d_w4", CFG, 0) == base
    variants = [
        teacher_key("mnist1d", data, "cnn1d_w4", CFG.model_copy(update={"lr": 0.02}), 0),
        teacher_key("mnist1d", data, "cnn1d_w4", CFG.model_copy(update={"epochs": 2}), 0),
        teacher_key("mnist1d", data, "cnn1d_w4", CFG, 1),
        teacher_key("mnist1d", data, "cnn1d_w8", CFG, 0),
        teacher_key("mnist1d", replace(data, description={**data.description, "fold": 1}), "cnn1d_w4", CFG, 0),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    digits = load_track("digits")
    assert teacher_key("digits", digits.for_seed(0), "cnn2d_w4", CFG, 0) != teacher_key(
        "digits", digits.for_seed(1), "cnn2d_w4", CFG, 0)
