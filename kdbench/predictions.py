"""Per-sample predictions in run records, so that paired analyses need no re-run (kdbench.stats).

A record's ``predictions`` holds, for its test and validation splits, each sample's predicted class and true
class, and its index in the track's data where that is not its position in the split (cross-validation folds),
each as the smallest unsigned integer type that holds it, lzma-compressed, base64 text with the type in front
(``u1:…``): about 10 kB for 10,000 test samples of 10 classes. Two records' predictions are compared by what
they decode to (``same_predictions``): the text also depends on the compressor's settings (older records used
lzma preset 9, whose 64 MiB dictionary cost 30-45 ms a call and compressed these arrays no smaller than the
default preset).
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma

import numpy as np
import torch

from kdbench.stats import Outcomes
from kdbench.tracks import sample_ids

DTYPES = ("u1", "u2", "u4")


def encode(values: torch.Tensor | np.ndarray) -> str:
    array = np.asarray(values)
    if array.size and array.min() < 0:
        raise ValueError("only non-negative integers (classes, sample indices) are encoded")
    top = int(array.max()) if array.size else 0
    dtype = next(d for d in DTYPES if top <= np.iinfo(np.dtype("<" + d)).max)
    data = lzma.compress(array.astype("<" + dtype).tobytes())
    return f"{dtype}:{base64.b64encode(data).decode('ascii')}"


def decode(text: str) -> np.ndarray:
    dtype, data = text.split(":", 1)
    return np.frombuffer(lzma.decompress(base64.b64decode(data)), dtype="<" + dtype).astype(np.int64)


def same_predictions(a: dict | None, b: dict | None) -> bool:
    """Whether two records' ``predictions`` hold the same splits, fields and values (text that does not decode
    is compared as text)."""
    return a == b or predictions_digest(a) == predictions_digest(b)


def predictions_digest(predictions: dict | None) -> str:
    """sha256 of what a record's ``predictions`` decode to (equal for equal values, whatever the compressor's
    settings); of their JSON text where they do not decode."""
    h = hashlib.sha256()
    try:
        for split, entry in sorted(predictions.items()):
            for field, text in sorted(entry.items()):
                values = decode(text).tobytes()
                h.update(f"{split}.{field}:{len(values)}:".encode())
                h.update(values)
    except (AttributeError, TypeError, ValueError, lzma.LZMAError):  # binascii.Error is a ValueError
        return hashlib.sha256(json.dumps(predictions, sort_keys=True).encode()).hexdigest()
    return h.hexdigest()


def split_predictions(preds: torch.Tensor, split) -> dict:
    """One split's entry: predicted class, true class and, unless it is the position, the sample's index."""
    entry = {"pred": encode(preds), "target": encode(split.y)}
    if getattr(split, "ids", None) is not None:
        entry["ids"] = encode(sample_ids(split))
    return entry


def split_outcome(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, correct) of one split's entry."""
    pred, target = decode(entry["pred"]), decode(entry["target"])
    ids = decode(entry["ids"]) if "ids" in entry else np.arange(len(pred))
    return ids, pred == target


def outcomes(records, split: str = "test") -> Outcomes:
    """Which samples each record's student got right, by seed (records of one method on one pair)."""
    return Outcomes({int(rec["seed"]): split_outcome(rec["predictions"][split]) for rec in records})
