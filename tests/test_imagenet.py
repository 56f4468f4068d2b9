"""The imagenet track and the timm pair on a tiny ImageFolder tree written here (JPEGs of random pixels) and a
random-init ResNet-34 saved as the "pretrained" teacher: loader, parameter counts, weights files, errors, and the
imagenet-smoke suite end to end through the command line."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.models import MODELS, count_params, create_model
from kdbench.tracks import load_track
from kdbench.tracks.imagenet import FolderSplit

WNIDS = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3


def _write_tree(root, split: str, per_class: int, rng: np.random.Generator) -> None:
    for wnid in WNIDS:
        folder = root / "imagenet" / split / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)


def _save_teacher(root, num_classes: int = len(WNIDS)):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = MODELS.get("resnet34").build(num_classes, (3, 224, 224), None)
    path = root / "pretrained" / "resnet34.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return teacher, path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """DATA_ROOT with imagenet/{train,val}/<wnid>/*.JPEG (3 classes × 8 / × 3) and pretrained/resnet34.safetensors."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    _write_tree(root, "train", TRAIN_PER_CLASS, rng)
    _write_tree(root, "val", VAL_PER_CLASS, rng)
    _save_teacher(root)
    return root


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# --- the loader


def test_splits_from_the_folder(data_root):
    data = load_track("imagenet", data_root)
    assert data.num_classes == len(WNIDS) and data.in_shape == (3, 224, 224)
    # validation: min(10, half a class) = 4 images of each class held out of train; test = imagenet/val
    assert (len(data.train), len(data.val), len(data.test)) == (12, 12, 9)
    assert torch.bincount(data.val.y).tolist() == [4, 4, 4]
    assert torch.bincount(data.train.y).tolist() == [4, 4, 4]
    assert torch.bincount(data.test.y).tolist() == [3, 3, 3]
    train, val = set(data.train.files.tolist()), set(data.val.files.tolist())
    assert not train & val and len(train | val) == len(WNIDS) * TRAIN_PER_CLASS
    assert all(f.startswith(b"train/") for f in train | val) and all(f.startswith(b"val/") for f in data.test.files)
    description = data.description
    assert description["classes"] == 3 and description["sizes"] == {"train": 12, "val": 12, "test": 9}
    assert "RandomResizedCrop(224" in description["train_transform"] and "CenterCrop(224)" in description["eval_transform"]
    assert json.loads(json.dumps(description)) == description  # goes into the config hash and MLflow params
    again = load_track("imagenet", data_root)
    assert np.array_equal(again.val.files, data.val.files) and again.description == description  # fixed split


def test_batches_are_reproducible(data_root, monkeypatch):
    train = load_track("imagenet", data_root).train

    def epoch(seed: int, workers: int):
        split = FolderSplit(train.root, train.files, train.y, train.transform, train.augment, num_workers=workers)
        return list(split.batches(4, torch.Generator().manual_seed(seed), train=True))

    first = epoch(0, 2)
    assert len(first) == 3 and all(x.shape == (4, 3, 224, 224) and y.dtype == torch.long for x, y in first)
    state = torch.get_rng_state()
    same = epoch(0, 0)  # in this process instead of two workers: the same samples, order and augmentation
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    for (x1, y1), (x2, y2) in zip(first, same, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([y for _, y in first]), train.y[order])  # the generator's shuffle, full batches
    other = epoch(1, 2)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # train=True augments (random crops and flips), train=False does not: the same order, other pixels
    plain = list(train.batches(4, torch.Generator().manual_seed(0), train=False))
    assert all(torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0]) for a, b in zip(first, plain))


def test_indexed_batches_give_each_sample_its_position(data_root):
    """What CRD's memory bank reads (the 'index' tap): the same batches, each with its samples' rows in the split."""
    train = load_track("imagenet", data_root).train
    indexed = list(train.indexed_batches(4, torch.Generator().manual_seed(0), train=True))
    plain = list(train.batches(4, torch.Generator().manual_seed(0), train=True))
    assert len(indexed) == len(plain) == 3
    for (idx, x, y), (x2, y2) in zip(indexed, plain):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(y, train.y[idx])
    assert torch.equal(torch.cat([idx for idx, *_ in indexed]),
                       torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:12])


def test_eval_batches_in_order_and_deterministic(data_root):
    data = load_track("imagenet", data_root)
    test = data.test
    batches = list(test.batches(4))
    assert [len(y) for _, y in batches] == [4, 4, 1]  # every sample, the last batch partial
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), test.y)
    assert torch.equal(x, torch.cat([b[0] for b in test.batches(4)]))
    assert torch.equal(test.sample(2), x[:2])  # sample() = the first inputs, eval transform
    assert x.shape[1:] == (3, 224, 224) and -3 < x.mean() < 3
    limited = data.limited({"train": 5, "test": 2})
    assert (len(limited.train), len(limited.test)) == (5, 2) and limited.description["limit"] == {"test": 2, "train": 5}


# --- the models


@pytest.mark.parametrize(("name", "params"), [("resnet34", 21_797_672), ("resnet18", 11_689_512)])
def test_parameter_counts_and_stages(name, params):
    """torchvision's counts at 1000 classes (torchvision's published parameter counts); stages are layer1..layer4."""
    from kdbench.taps import probe_shapes

    model = create_model(name, random_init=True)
    assert count_params(model) == params
    shapes = probe_shapes(model, [f"stage:{i}" for i in range(4)], torch.zeros(2, 3, 224, 224))
    assert shapes == {"logits": (1000,), "stage:0": (64, 56, 56), "stage:1": (128, 28, 28),
                      "stage:2": (256, 14, 14), "stage:3": (512, 7, 7)}


def test_pretrained_weights_formats(tmp_path):
    """A safetensors file, a torchvision-format .pth state dict (no num_batches_tracked) load; garbage and a
    wrong-shaped file are refused in one line."""
    import torchvision

    build = MODELS.get("resnet34").build
    reference = torchvision.models.resnet34(num_classes=10)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet34-b627a593.pth")
    model = build(10, (3, 224, 224), tmp_path / "resnet34-b627a593.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)
    torch.save(state, tmp_path / "renamed.safetensors")  # a .pth under the expected name also loads
    assert torch.equal(build(10, (3, 224, 224), tmp_path / "renamed.safetensors").fc.weight, reference.fc.weight)

    (tmp_path / "garbage.safetensors").write_bytes(b"not weights at all" * 10)
    with pytest.raises(KdbenchError, match="not a safetensors or PyTorch weights file") as info:
        build(10, (3, 224, 224), tmp_path / "garbage.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(KdbenchError, match=r"do not fit resnet34 with 1000 classes: 2 wrong shapes \(e.g. fc\.") as info:
        build(1000, (3, 224, 224), tmp_path / "resnet34-b627a593.pth")
    assert "\n" not in str(info.value)


# --- errors through the command line


def test_missing_train_folder(tmp_path, capsys):
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    err = _one_line_error(capsys, ["run", "--suite", "imagenet-smoke", "--data-root", str(tmp_path),
                                   "--results-dir", str(tmp_path / "r")])
    assert str(tmp_path / "imagenet" / "train") in err and "ILSVRC2012" in err


def test_unsorted_val_folder(tmp_path):
    """The raw ILSVRC val folder (images not in class folders) is refused with what to do."""
    rng = np.random.default_rng(0)
    _write_tree(tmp_path, "train", 2, rng)
    (tmp_path / "imagenet" / "val").mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imagenet" / "val" / "x.JPEG")
    with pytest.raises(KdbenchError, match="no images in class folders") as info:
        load_track("imagenet", tmp_path)
    assert "\n" not in str(info.value)


def test_missing_data_root(tmp_path, capsys):
    err = _one_line_error(capsys, ["run", "--suite", "imagenet-smoke", "--results-dir", str(tmp_path / "r")])
    assert "--data-root" in err and "imagenet/train/<wnid>" in err


def test_missing_pretrained_file(data_root, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    (root / "imagenet").symlink_to(data_root / "imagenet")
    err = _one_line_error(capsys, ["run", "--suite", "imagenet-smoke", "--data-root", str(root),
                                   "--results-dir", str(tmp_path / "r")])
    assert str(root / "pretrained" / "resnet34.safetensors") in err and "IMAGENET1K_V1" in err


# --- the smoke suite end to end


def _smoke(data_root, results, methods: list[str]) -> list[dict]:
    argv = ["run", "--suite", "imagenet-smoke", "--data-root", str(data_root), "--results-dir", str(results)]
    assert main(argv + [a for m in methods for a in ("--method", m)]) == 0
    return [json.loads(p.read_text()) for p in sorted(results.rglob("seed*.json"))]


def test_smoke_suite_vanilla_kd(data_root, tmp_path):
    start = time.perf_counter()
    (record,) = _smoke(data_root, tmp_path / "r", ["vanilla_kd"])
    assert record["status"] == "finished" and record["track"] == "imagenet"
    assert (record["teacher"], record["student"]) == ("resnet34", "resnet18")
    assert record["config"]["teacher_train"] is None and "resnet34" in record["config"]["pretrained"]
    assert record["config"]["data"]["sizes"] == {"train": 12, "val": 12, "test": 9}
    assert record["metrics"]["params"] == 11_178_051  # resnet18 at 3 classes
    assert len(record["history"]) == 1 and np.isfinite(record["history"][0]["train_loss"])
    print(f"imagenet-smoke vanilla_kd: {time.perf_counter() - start:.1f}s")


@pytest.mark.slow
def test_smoke_suite_every_method(data_root, tmp_path):
    records = _smoke(data_root, tmp_path / "r", [])
    from kdbench.suite import expand, load_suite

    assert sorted(r["method"] for r in records) == sorted(spec.method for spec in expand(load_suite("imagenet-smoke")))
    assert all(r["status"] == "finished" for r in records), [(r["method"], r.get("error")) for r in records]
    # re-running a record's config and seed gives the same accuracy and agreement, exactly
    (kd,) = [p for p in sorted((tmp_path / "r").rglob("seed*.json")) if p.parent.name == "vanilla_kd"]
    assert main(["verify", str(kd), "--data-root", str(data_root)]) == 0
