"""The paired analysis behind every Δ: the two-way bootstrap against a plain loop, Holm, MDE, CV folds."""

import numpy as np
import pytest

from kdbench.stats import Outcomes, Resampler, compare, holm, minimum_detectable_effect, verdict


def _loop_bootstrap(correct_a, correct_b, present, replicates, seed):
    """Owen's pigeonhole bootstrap written as a plain loop over replicates, drawing the same numbers as
    kdbench.stats (seeds first, then samples, each as integer draws)."""
    rng = np.random.default_rng(seed)
    s, n = present.shape
    seed_draws = rng.integers(0, s, size=(replicates, s))
    sample_draws = rng.integers(0, n, size=(replicates, n))
    reps = []
    for b in range(replicates):
        cells = present[np.ix_(seed_draws[b], sample_draws[b])]
        diff = (correct_a - correct_b)[np.ix_(seed_draws[b], sample_draws[b])]
        reps.append(100 * diff[cells].sum() / max(cells.sum(), 1))
    return np.array(reps)


def _outcomes(correct, ids_per_seed):
    return Outcomes({s: (ids, correct[s, ids]) for s, ids in enumerate(ids_per_seed)})


@pytest.mark.parametrize("cross_validated", [False, True])
def test_bootstrap_matches_a_plain_loop(cross_validated):
    rng = np.random.default_rng(3)
    seeds, n = 5, 200
    a = rng.random((seeds, n)) < 0.9
    b = rng.random((seeds, n)) < 0.85
    if cross_validated:  # each seed tests one fifth of the samples, as digits' folds do
        folds = np.array_split(rng.permutation(n), seeds)
        ids = [np.sort(f) for f in folds]
    else:
        ids = [np.arange(n)] * seeds
    present = np.zeros((seeds, n), dtype=bool)
    for s, i in enumerate(ids):
        present[s, i] = True
    resampler = Resampler(list(range(seeds)), np.arange(n), replicates=300, seed=7)
    diff = resampler.difference(_outcomes(a, ids), _outcomes(b, ids))
    reps = _loop_bootstrap(a.astype(float), b.astype(float), present, 300, 7)
    assert diff.delta == pytest.approx(100 * (a.astype(float) - b)[present].mean())
    assert diff.low == pytest.approx(np.quantile(reps, 0.025))
    assert diff.high == pytest.approx(np.quantile(reps, 0.975))
    assert diff.se == pytest.approx(reps.std(ddof=1))
    tail = min((reps <= 0).sum(), (reps >= 0).sum())
    assert diff.p_value == pytest.approx(min(1, 2 * (tail + 1) / 301))
    assert diff.seeds == seeds and diff.samples == n


def test_identical_methods_differ_by_nothing():
    correct = np.random.default_rng(0).random((3, 100)) < 0.8
    same = _outcomes(correct, [np.arange(100)] * 3)
    diff = compare(same, same, replicates=200)
    assert (diff.delta, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.p_value == 1.0 and verdict(diff, holm([diff.p_value])[0]) == "not significant"


def test_a_clear_gain_is_significant_and_a_loss_is_worse():
    rng = np.random.default_rng(1)
    good = rng.random((5, 2000)) < 0.95
    bad = rng.random((5, 2000)) < 0.85
    ids = [np.arange(2000)] * 5
    up = compare(_outcomes(good, ids), _outcomes(bad, ids), replicates=500)
    down = compare(_outcomes(bad, ids), _outcomes(good, ids), replicates=500)
    assert up.low > 5 and up.p_value < 0.01 and verdict(up, True) == "better"
    assert down.high < -5 and verdict(down, True) == "worse"


def test_runs_are_paired_by_seed_number_only_where_both_have_one():
    rng = np.random.default_rng(2)
    a = rng.random((4, 50)) < 0.9
    b = rng.random((4, 50)) < 0.7
    ids = np.arange(50)
    left = Outcomes({s: (ids, a[s]) for s in (0, 1, 2)})
    right = Outcomes({s: (ids, b[s]) for s in (1, 2, 3)})
    diff = compare(left, right, replicates=100)
    assert diff.seeds == 2
    assert diff.delta == pytest.approx(100 * (a[1:3].astype(float) - b[1:3]).mean())


def test_holm_matches_a_hand_computation():
    # sorted p: 0.01·3 = 0.03 ≤ 0.05 rejects; 0.03·2 = 0.06 > 0.05 stops: only the first is rejected
    assert holm([0.03, 0.01, 0.04]) == [False, True, False]
    assert holm([0.001, 0.02, 0.04]) == [True, True, True]  # 0.003, 0.04, 0.04
    assert holm([]) == []


def test_minimum_detectable_effect_by_hand():
    # (z_0.975 + z_0.8) · SE = (1.959964 + 0.841621) · 0.2
    assert minimum_detectable_effect(0.2) == pytest.approx(0.560317, abs=1e-6)


def test_a_row_with_fewer_seeds_than_its_table_keeps_a_sensible_interval():
    rng = np.random.default_rng(4)
    correct = rng.random((5, 300)) < 0.9
    resampler = Resampler(list(range(5)), np.arange(300), replicates=400)
    partial = Outcomes({s: (np.arange(300), correct[s]) for s in (0, 1)})  # 2 of the table's 5 seeds
    mean, low, high = resampler.accuracy(partial)
    assert mean == pytest.approx(100 * correct[:2].mean())
    assert 80 < low <= mean <= high < 100  # replicates that drew neither seed are left out, not counted as 0
