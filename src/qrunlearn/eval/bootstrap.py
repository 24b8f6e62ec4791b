"""Percentile bootstrap intervals (MUSE reports `scipy.stats.bootstrap(..., method='percentile')` intervals for
its mean ROUGE scores; this is the same estimator, vectorised and seeded)."""

from __future__ import annotations

import numpy as np

from qrunlearn.eval.mia import pair_wins

LEVEL = 0.95


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray, resamples: int, seed: int, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean of `values` over `resamples` resamples with replacement."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return _percentiles(values[picks].mean(axis=1), level)


def auc_samples(first: np.ndarray, second: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """AUCs of `resamples` stratified resamples (each split resampled on its own, sizes kept)."""
    wins = pair_wins(first, second)
    n_first, n_second = wins.shape
    rng = np.random.default_rng(seed)
    # counts[b, i]: how often item i was drawn in resample b; the resampled AUC is a weighted mean of wins
    counts_first = _draw_counts(rng, n_first, resamples)
    counts_second = _draw_counts(rng, n_second, resamples)
    return ((counts_first @ wins) * counts_second).sum(axis=1) / (n_first * n_second)


def _draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    picks = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + picks).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    return _percentiles(np.asarray(samples, dtype=np.float64), level)
