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


def test_a_teacher_trained_from_uncommitted_code_is_flagged_when_reused_from_a_clean_tree(tmp_path, monkeypatch,
                                                                                         capsys):
    """The key hashes the config, not the code: a teacher cached from a dirty tree would be reused silently by a
    committed one (and its records would not reproduce from a cold cache). The file says which code trained it."""
    from kdbench.teachers import teacher_path, trained_from

    data = load_track("mnist1d")
    monkeypatch.setenv("KDBENCH_HOME", str(tmp_path))
    monkeypatch.setattr("kdbench.records.git_state", lambda: ("a" * 40, True))
    _, key = load_or_train_teacher("mnist1d", data, "cnn1d_w4", CFG, seed=0)
    path = teacher_path("mnist1d", "cnn1d_w4", key)
    assert trained_from(path) == {"git_commit": "a" * 40, "git_dirty": True}
    assert "warning" not in capsys.readouterr().err  # still the dirty tree: nothing to say
    monkeypatch.setattr("kdbench.records.git_state", lambda: ("b" * 40, False))
    load_or_train_teacher("mnist1d", data, "cnn1d_w4", CFG, seed=0)
    err = capsys.readouterr().err
    assert f"warning: teacher cnn1d_w4 at {path} was trained from a tree with uncommitted changes (on aaaaaaaaaa)" in err
    assert "delete it to retrain it from this commit" in err
