"""The ``sst2`` track: GLUE SST-2 sentence sentiment (Socher et al. 2013; Wang et al. 2019, GLUE), two classes.

Data: the GLUE SST-2 folder under ``--data-root``: ``DATA_ROOT/SST-2/train.tsv`` and ``dev.tsv`` (tab-separated,
header ``sentence\\tlabel``, no quoting: GLUE's ``quoting=3``, so quotes in sentences are kept), read with Hugging
Face ``datasets`` ("csv" builder, local files). With ``--download`` and no local files, ``nyu-mll/glue`` / ``sst2``
is fetched from the hub and written in that layout first.

Protocol: GLUE's test labels are hidden, so the test split is GLUE dev (872 sentences) and the validation split
is a fixed, stratified 10 % of GLUE train (seed ``VAL_SEED``): 60 614 / 6 735 / 872.

Tokens: the tokenizer of ``DATA_ROOT/pretrained/bert-base-uncased`` (the models' own folder), applied once at
load time, truncated and padded to ``MAX_LENGTH`` = 128 (the BERT paper's GLUE setting and ``run_glue.py``'s
default ``max_seq_length``). A sample x is a LongTensor (2, 128): token ids, then the attention mask.
The description (part of every run's config) names the files with their sha256, the tokenizer files' sha256,
the length and the split seed.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdbench.errors import KdbenchError
from kdbench.models.bert import MAX_LENGTH, PRETRAINED, PRETRAINED_HOW_TO_GET
from kdbench.paths import kdbench_home
from kdbench.tracks import VAL_SEED, Split, TrackData, missing_data, register_track, require_data_root

VAL_FRACTION = 0.1
EVAL_BATCH = 256
FILES = {"train": "train.tsv", "test": "dev.tsv"}  # GLUE file of each split we read (test := GLUE dev)
HUB_DATASET, HUB_CONFIG = "nyu-mll/glue", "sst2"
HOW_TO_GET = ("download GLUE SST-2 (https://dl.fbaipublicfiles.com/glue/data/SST-2.zip) and unzip it into "
              "DATA_ROOT, or pass --download to fetch nyu-mll/glue sst2 from the Hugging Face hub")
TOKENIZER_FILES = ("tokenizer", "vocab", "special_tokens_map", "added_tokens")  # name prefixes in that folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_dir() -> str:
    return str(kdbench_home() / "datasets")


def _quiet_datasets():
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    return (lambda: None) if was_disabled else datasets.enable_progress_bars


def fetch_from_hub(folder: Path) -> None:
    """Fetch SST-2 from the hub and write the missing GLUE files (``sentence\\tlabel``) into ``folder``."""
    from datasets import load_dataset

    hub = load_dataset(HUB_DATASET, HUB_CONFIG, cache_dir=_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        path = folder / name
        if path.is_file():
            continue
        rows = zip(hub[split]["sentence"], hub[split]["label"])
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text("".join(["sentence\tlabel\n", *(f"{s}\t{y}\n" for s, y in rows)]), encoding="utf-8")
        os.replace(tmp, path)


def read_tsv(paths: dict[str, Path]) -> dict[str, tuple[list[str], np.ndarray]]:
    """(sentences, labels) per split from GLUE SST-2 tsv files, through ``datasets``' csv builder."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    restore = _quiet_datasets()
    try:
        loaded = datasets.load_dataset(
            "csv", data_files={split: str(p) for split, p in paths.items()}, delimiter="\t",
            quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, features=features, cache_dir=_cache_dir(),
        )
    except Exception as exc:  # noqa: BLE001 - any parse failure is one line naming the files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KdbenchError(f"{', '.join(map(str, paths.values()))}: not GLUE SST-2 tsv files "
                           f"(header sentence<TAB>label, labels 0/1): {first}") from None
    finally:
        restore()
    return {split: (list(loaded[split]["sentence"]), np.asarray(loaded[split]["label"])) for split in paths}


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise missing_data(folder, f"the {PRETRAINED} folder (tokenizer and weights)", PRETRAINED_HOW_TO_GET)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"{folder}: no tokenizer could be read ({str(exc).splitlines()[0]}); "
                           f"{PRETRAINED_HOW_TO_GET}") from None


def tokenize(tokenizer, sentences: list[str]) -> torch.Tensor:
    """(N, 2, MAX_LENGTH) LongTensor: token ids and attention mask, truncated and padded to MAX_LENGTH."""
    enc = tokenizer(sentences, max_length=MAX_LENGTH, padding="max_length", truncation=True,
                    return_attention_mask=True, return_token_type_ids=False, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()


@register_track("sst2", tier="gpu",
                summary="GLUE SST-2 (local tsv or --download), bert-base-uncased tokens ≤ 128: 60614/6735/872")
def load_sst2(data_root: Path | None = None, download: bool = False) -> TrackData:
    root = require_data_root("sst2", data_root, f"SST-2/train.tsv and SST-2/dev.tsv (GLUE layout) and "
                                                f"pretrained/{PRETRAINED}/ under it")
    folder = root / "SST-2"
    paths = {split: folder / name for split, name in FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing and download:
        fetch_from_hub(folder)
    elif missing:
        raise missing_data(missing[0], "SST-2 file", HOW_TO_GET)
    tokenizer_dir = root / "pretrained" / PRETRAINED
    tokenizer = load_tokenizer(tokenizer_dir)
    data = read_tsv(paths)
    sentences, labels = data["train"]
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=VAL_FRACTION, stratify=labels,
                                          random_state=VAL_SEED)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    x_all, y_all = tokenize(tokenizer, sentences), torch.as_tensor(labels, dtype=torch.long)
    x_test = tokenize(tokenizer, data["test"][0])
    y_test = torch.as_tensor(data["test"][1], dtype=torch.long)

    def split(x: torch.Tensor, y: torch.Tensor) -> Split:
        return Split(x, y, eval_batch=EVAL_BATCH)

    tokenizer_files = sorted(p for p in tokenizer_dir.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_FILES))
    description = {
        "source": "GLUE SST-2 tsv files (sentence<TAB>label, no quoting), read with datasets' csv builder",
        "files": {f"SST-2/{p.name}": sha256_file(p) for p in paths.values()},
        "test": "SST-2/dev.tsv (GLUE test labels are hidden)",
        "tokenizer": f"pretrained/{PRETRAINED}",
        "tokenizer_files": {p.name: sha256_file(p) for p in tokenizer_files},
        "max_length": MAX_LENGTH,
        "padding": "max_length",
        "truncation": True,
        "val_fraction": VAL_FRACTION,
        "val_seed": VAL_SEED,
    }
    return TrackData(
        split(x_all[train_idx], y_all[train_idx]), split(x_all[val_idx], y_all[val_idx]), split(x_test, y_test),
        num_classes=2, in_shape=(2, MAX_LENGTH), description=description,
    )
