"""ROC AUCs of membership-inference scores, exactly as MUSE computes them.

MUSE labels the first split 0 ("non-member") and the second 1 ("member") and ranks by the negated score:
`roc_curve(y, -score)`. For PrivLeak the pair is (privleak/forget, privleak/holdout): a model that has
memorised the forget texts gives them lower scores than the holdout texts, so the AUC falls towards 0; a
model that never saw either sits near 0.5.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

FloatOrArray = TypeVar("FloatOrArray", float, np.ndarray)


def muse_auc(first: np.ndarray, second: np.ndarray) -> float:
    """AUC of `roc_curve([0]*len(first) + [1]*len(second), -scores)` with sklearn's trapezoidal `auc`, as MUSE
    computes it, without sklearn (whose import costs seconds): the trapezoidal ROC AUC is the Mann-Whitney
    statistic, the share of (first, second) pairs where the second text scores lower, ties counting one half.
    From mid-ranks: U = (sum of the first split's ranks) - n0 (n0 + 1) / 2, exact in float64 (half-integers), then
    one division; sklearn's trapezoid sum agrees to ~1e-16 (tested against it)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if not (len(first) and len(second)):
        raise ValueError("an AUC needs texts in both splits")
    scores = np.concatenate([first, second])
    if np.isnan(scores).any():
        raise ValueError("AUC scores contain NaN")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(mid_ranks[inverse[:len(first)]].sum())
    pairs_won = rank_sum - len(first) * (len(first) + 1) / 2.0
    return pairs_won / (len(first) * len(second))


def pair_wins(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(len(first), len(second)) matrix: 1 where the second split's text ranks above the first's (a lower
    score), 0.5 on ties, else 0. Its mean is the trapezoidal ROC AUC (the Mann-Whitney statistic), which
    is what lets bootstrap resamples be scored without re-running the ROC."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    diff = first[:, None] - second[None, :]
    return (diff > 0).astype(np.float64) + 0.5 * (diff == 0)


def privleak(auc: FloatOrArray, retrain_auc: float) -> FloatOrArray:
    """MUSE's PrivLeak: (AUC - AUC_retrain) / AUC_retrain x 100."""
    return (auc - retrain_auc) / retrain_auc * 100.0
