"""Paired comparisons of two methods from their per-sample test predictions: Δ, its 95 % interval, a p-value.

Both sources of noise count: the training seed and the finite test set. Runs are paired by seed number (the
same seed draws the same data order, initial weights and, on a cross-validated track, the same fold), and a
test sample is identified by its index in the track's data, so two methods are compared on the same samples.
The interval is a **two-way (pigeonhole) bootstrap** (Owen 2007, *Ann. Appl. Stat.* 1(2), "The pigeonhole
bootstrap"): every replicate resamples the seeds and, independently, the test samples, both with replacement,
and recomputes Δ = mean over the (seed, sample) cells present of ``correct_A − correct_B``. A cell is present
when that seed's run tested that sample (all cells on a fixed test set; one fold's samples per seed under
cross-validation). The 95 % interval is the percentile interval of the replicates; the two-sided p-value is
twice the smaller tail of the replicates beyond 0 (add-one corrected). Across the rows of one table the
p-values are corrected with Holm's method (statsmodels ``multipletests``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from statsmodels.stats.multitest import multipletests

REPLICATES = 2000
BOOTSTRAP_SEED = 0  # fixed: the leaderboard regenerates byte for byte
ALPHA = 0.05
POWER = 0.8
MAX_HALF_WIDTH = 0.5  # points; a table whose widest interval exceeds this is labelled underpowered


@dataclass(frozen=True)
class Outcomes:
    """Whether each tested sample was classified correctly, per seed: ``{seed: (sample ids, correct)}``."""

    by_seed: dict[int, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Difference:
    delta: float  # points (percentage of samples)
    low: float
    high: float
    se: float
    p_value: float
    seeds: int
    samples: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


class Resampler:
    """Bootstrap weights over seeds and samples, drawn once and shared by every comparison made with it
    (common random numbers: the rows of one table are compared under the same replicates)."""

    def __init__(self, seeds: list[int], ids: np.ndarray, replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED):
        rng = np.random.default_rng(seed)
        self.seeds, self.ids = list(seeds), np.asarray(ids)
        self.seed_weights = _counts(rng, len(self.seeds), replicates)  # (B, S)
        self.sample_weights = _counts(rng, len(self.ids), replicates)  # (B, N)

    def difference(self, a: Outcomes, b: Outcomes) -> Difference:
        """Δ = A − B in points over the seeds both have, with its interval and p-value."""
        correct, present = self._cells(a, b)
        delta = 100 * (correct[0] - correct[1])[present].mean()
        reps = self._replicates(np.where(present, correct[0] - correct[1], 0.0), present)
        low, high = np.quantile(reps, [ALPHA / 2, 1 - ALPHA / 2])
        tail = min((reps <= 0).sum(), (reps >= 0).sum())
        p = min(1.0, 2 * (tail + 1) / (len(reps) + 1))
        return Difference(float(delta), float(low), float(high), float(reps.std(ddof=1)), float(p),
                          int(present.any(1).sum()), int(present.any(0).sum()))

    def accuracy(self, a: Outcomes) -> tuple[float, float, float]:
        """Mean accuracy (points) and its 95 % interval under the same resampling."""
        correct, present = self._cells(a)
        low, high = np.quantile(self._replicates(np.where(present, correct[0], 0.0), present), [ALPHA / 2, 1 - ALPHA / 2])
        return float(100 * correct[0][present].mean()), float(low), float(high)

    def _replicates(self, values: np.ndarray, present: np.ndarray) -> np.ndarray:
        """The mean (points) over the present cells of every replicate; a replicate that drew none of them (a
        row with fewer seeds than the table) is left out."""
        num = np.einsum("bs,sn,bn->b", self.seed_weights, values, self.sample_weights, optimize=True)
        den = np.einsum("bs,sn,bn->b", self.seed_weights, present.astype(float), self.sample_weights, optimize=True)
        return 100 * num[den > 0] / den[den > 0]

    def _cells(self, *outcomes: Outcomes) -> tuple[np.ndarray, np.ndarray]:
        """(correct per method, seed × sample; present where every method's run of that seed tested it)."""
        column = {int(i): k for k, i in enumerate(self.ids)}
        correct = np.zeros((len(outcomes), len(self.seeds), len(self.ids)))
        present = np.ones((len(self.seeds), len(self.ids)), dtype=bool)
        for m, out in enumerate(outcomes):
            seen = np.zeros_like(present)
            for s, seed in enumerate(self.seeds):
                if seed not in out.by_seed:
                    continue
                ids, ok = out.by_seed[seed]
                cols = np.fromiter((column[int(i)] for i in ids), dtype=np.int64, count=len(ids))
                seen[s, cols] = True
                correct[m, s, cols] = ok
            present &= seen
        return correct, present


def _counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """(replicates, n) multinomial counts: how often each of n items is drawn in a resample of size n."""
    draws = rng.integers(0, n, size=(replicates, n))
    offsets = (np.arange(replicates) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=replicates * n).reshape(replicates, n).astype(float)


def compare(a: Outcomes, b: Outcomes, replicates: int = REPLICATES) -> Difference:
    """One comparison A − B, resampled over the seeds both have and every sample either tested."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    ids = np.unique(np.concatenate([a.by_seed[s][0] for s in seeds] + [b.by_seed[s][0] for s in seeds]))
    return Resampler(seeds, ids, replicates).difference(a, b)


def holm(p_values: list[float]) -> list[bool]:
    """Which hypotheses are rejected at ``ALPHA`` after Holm's correction for the family given."""
    if not p_values:
        return []
    return [bool(r) for r in multipletests(p_values, alpha=ALPHA, method="holm")[0]]


def verdict(diff: Difference, rejected: bool) -> str:
    if not rejected:
        return "not significant"
    return "better" if diff.delta > 0 else "worse"


def minimum_detectable_effect(se: float) -> float:
    """The smallest true Δ (points) detected with probability ``POWER`` by a two-sided test at ``ALPHA``."""
    return float((norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)) * se)
