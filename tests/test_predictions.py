"""Per-sample predictions in records: compact, lossless, and what the paired analysis reads."""

import base64
import lzma

import numpy as np
import pytest
import torch

from kdbench.predictions import decode, encode, outcomes, predictions_digest, same_predictions, split_predictions
from kdbench.tracks import Split


@pytest.mark.parametrize("top, dtype", [(9, "u1"), (999, "u2"), (70_000, "u4")])
def test_round_trip_in_the_smallest_type(top, dtype):
    values = np.random.default_rng(0).integers(0, top + 1, 5000)
    values[0] = top
    text = encode(values)
    assert text.startswith(dtype + ":")
    assert np.array_equal(decode(text), values)


def test_ten_thousand_labels_stay_small_and_negatives_are_refused():
    assert len(encode(np.random.default_rng(0).integers(0, 10, 10_000))) < 7_000
    with pytest.raises(ValueError):
        encode(np.array([-1, 2]))


def test_split_entries_carry_ids_only_where_they_are_not_positions():
    plain = Split(torch.zeros(4, 1), torch.tensor([0, 1, 2, 3]))
    fold = Split(torch.zeros(3, 1), torch.tensor([1, 1, 0]), ids=torch.tensor([10, 4, 7]))
    assert set(split_predictions(torch.tensor([0, 1, 1, 3]), plain)) == {"pred", "target"}
    entry = split_predictions(torch.tensor([1, 0, 0]), fold)
    got = outcomes([{"seed": 5, "predictions": {"test": entry}}]).by_seed[5]
    assert got[0].tolist() == [10, 4, 7] and got[1].tolist() == [True, False, True]
    ids, correct = outcomes([{"seed": 0, "predictions": {"test": split_predictions(torch.tensor([0, 1, 1, 3]), plain)}}]).by_seed[0]
    assert ids.tolist() == [0, 1, 2, 3] and correct.tolist() == [True, True, False, True]


def test_predictions_compare_by_value_not_by_compressed_text():
    values = np.random.default_rng(1).integers(0, 10, 300).astype("u1")
    old_text = "u1:" + base64.b64encode(lzma.compress(values.tobytes(), preset=9)).decode("ascii")
    assert old_text != encode(values)  # the dictionary size is in the stream's header
    ours = {"test": {"pred": encode(values), "target": encode(values)}}
    assert same_predictions({"test": {"pred": old_text, "target": encode(values)}}, ours)
    assert predictions_digest({"test": {"pred": old_text, "target": encode(values)}}) == predictions_digest(ours)
    changed = values.copy()
    changed[7] = (changed[7] + 1) % 10
    assert not same_predictions({"test": {"pred": encode(changed), "target": encode(values)}}, ours)
    assert predictions_digest({"test": {"pred": encode(changed), "target": encode(values)}}) != predictions_digest(ours)
    assert not same_predictions({"test": {"pred": encode(values)}}, ours)  # a field missing
    assert not same_predictions({"val": ours["test"]}, ours)
    assert not same_predictions({"test": {"pred": "tampered", "target": encode(values)}}, ours)
    assert same_predictions(None, None) and not same_predictions(None, ours)
