"""CIFAR tracks on tiny data written in the native python-version format, and the CIFAR smoke suites."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from kdbench.cli import main
from kdbench.method import METHODS
from kdbench.runner import Placement, preflight
from kdbench.suite import expand, load_suite
from kdbench.tracks import load_track
from kdbench.tracks.cifar import PAD, pad_crop_flip


def write_cifar(root, track: str, n_train: int = 1000, n_test: int = 200) -> None:
    """Files laid out and pickled as the official python-version archives are (bytes keys, uint8 rows)."""
    rng = np.random.default_rng(0)
    if track == "cifar100":
        folder, label_key, classes = root / "cifar-100-python", b"fine_labels", 100
        files = {"train": n_train, "test": n_test}
    else:
        folder, label_key, classes = root / "cifar-10-batches-py", b"labels", 10
        files = {**{f"data_batch_{i}": n_train // 5 for i in range(1, 6)}, "test_batch": n_test}
    folder.mkdir(parents=True)
    for name, n in files.items():
        batch = {b"batch_label": name.encode(), label_key: [int(v) for v in np.arange(n) % classes],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"img.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar100")
    write_cifar(root, "cifar10")
    return root


@pytest.mark.parametrize("track", ["cifar100", "cifar10"])
def test_splits_are_fixed_disjoint_and_normalized(cifar_root, track):
    data = load_track(track, cifar_root)
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, 200)
    assert data.num_classes == (100 if track == "cifar100" else 10) and data.in_shape == (3, 32, 32)
    assert data.train.x.dtype == torch.uint8  # kept compact; normalised per batch
    rows = {bytes(r.numpy()) for r in data.train.x.flatten(1)}
    assert not rows & {bytes(r.numpy()) for r in data.val.x.flatten(1)}
    again = load_track(track, cifar_root)
    assert torch.equal(again.val.x, data.val.x) and data.description == again.description
    x, _ = next(data.test.batches(200))
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.3  # (x / 255 - mean) / std


def test_augmentation_is_pad_crop_flip_and_seeded():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).to(torch.uint8)
    out = pad_crop_flip(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    top, left = torch.randint(0, 2 * PAD + 1, (2,), generator=g), torch.randint(0, 2 * PAD + 1, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (PAD,) * 4)
    for i in range(2):
        want = padded[i, :, top[i] : top[i] + 32, left[i] : left[i] + 32]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)
    assert torch.equal(out, pad_crop_flip(x, torch.Generator().manual_seed(5)))


def test_training_batches_repeat_with_the_generator(cifar_root):
    data = load_track("cifar100", cifar_root)
    first = [b for b, _ in data.train.batches(64, torch.Generator().manual_seed(1), train=True)]
    second = [b for b, _ in data.train.batches(64, torch.Generator().manual_seed(1), train=True)]
    assert len(first) == 900 // 64 and all(torch.equal(a, b) for a, b in zip(first, second))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-100-python"
    write_cifar(tmp_path, "cifar100", n_train=100, n_test=20)
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": Exploit(str(marker))}))
    code = main(["run", "--suite", "cifar100-smoke", "--data-root", str(tmp_path), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert err.startswith(f"kdbench: error: {folder / 'train'} is not a CIFAR") and "\n" not in err


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("missing", ["root", "file"])
def test_missing_data_names_the_path_and_the_fix(tmp_path, capsys, missing):
    args = ["run", "--suite", "cifar10-smoke", "--results-dir", str(tmp_path / "r")]
    if missing == "file":
        write_cifar(tmp_path, "cifar10", n_train=100, n_test=20)
        (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
        args += ["--data-root", str(tmp_path)]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    if missing == "root":
        assert "pass --data-root DIR, with cifar-10-batches-py/" in err
    else:
        assert f"not found at {tmp_path / 'cifar-10-batches-py' / 'data_batch_3'}" in err and "--download" in err
    assert not (tmp_path / "r").exists()


def test_every_smoke_and_full_cifar_run_builds(cifar_root):
    """Every method on every CRD pair: taps resolve and shapes match before anything trains."""
    for name in ("cifar100", "cifar10", "cifar100-smoke", "cifar10-smoke"):
        specs = expand(load_suite(name))
        assert {s.pair for s in specs} == {"resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2", "resnet56:resnet20", "vgg13:vgg8"}
        preflight(specs, Placement(cifar_root))


def test_crd_protocol_in_the_full_suite():
    spec = next(s for s in expand(load_suite("cifar100"), methods=["vanilla_kd"]) if s.student == "resnet8x4")
    t = spec.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay) == (240, 64, "sgd", 0.05, 0.9, 5e-4)
    assert (t.schedule, t.milestones, t.gamma) == ("multistep", (150, 180, 210), 0.1)
    assert spec.method_config["temperature"] == 4.0 and spec.teacher_train == t
    assert (spec.method_config["ce_weight"], spec.method_config["kd_weight"]) == (0.1, 0.9)


def test_per_pair_settings_of_the_references():
    """VGG's feat[1:-1] is four stages; DKD, DKD+LS and ReviewKD take their references' per-pair settings."""
    specs = {(s.student, s.method): s.method_config for s in expand(load_suite("cifar100"), seeds=(0,))}
    for method in ("attention_transfer", "nst", "vid", "review_kd"):
        assert specs["vgg8", method]["stages"] == [1, 2, 3, 4] and specs["resnet20", method]["stages"] == [-3, -2, -1]
    assert [specs[s, "dkd"]["beta"] for s in ("resnet8x4", "wrn_16_2", "resnet20", "vgg8")] == [8.0, 6.0, 2.0, 6.0]
    ls = specs["resnet20", "dkd+ls"]
    assert (ls["temperature"], ls["alpha"], ls["beta"], ls["logit_standardization"]) == (3.0, 18.0, 36.0, True)
    assert [specs[s, "review_kd"]["review_weight"] for s in ("resnet8x4", "resnet20")] == [5.0, 0.6]


@pytest.mark.parametrize(("suite", "methods", "params"), [
    ("cifar100-smoke", [], 278_324),  # every method; resnet20 at 100 classes
    ("cifar10-smoke", ["--method", "vanilla_kd"], 272_474),  # resnet20 at 10 classes
])
def test_smoke_suites_run_end_to_end(cifar_root, tmp_path, suite, methods, params):
    """On one CRD pair, through the command line, on files in the native format."""
    out = tmp_path / "r"
    args = ["run", "--suite", suite, "--pair", "resnet56:resnet20", *methods, "--data-root", str(cifar_root),
            "--results-dir", str(out)]
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in out.rglob("seed*.json")]
    assert len(records) == (1 if methods else len(METHODS.names())) and all(r["status"] == "finished" for r in records)
    assert {r["config"]["data"]["limit"]["train"] for r in records} == {128}
    assert all(r["metrics"]["params"] == params for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["cifar100-smoke", "cifar10-smoke"])
def test_whole_smoke_suite(cifar_root, tmp_path, suite):
    assert main(["run", "--suite", suite, "--data-root", str(cifar_root), "--results-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.rglob("seed*.json"))) == 4 * len(METHODS.names())  # 4 pairs, every registered method
