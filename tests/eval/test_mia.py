"""AUCs exactly as MUSE's `roc_curve(y, -score)`, and PrivLeak."""

from __future__ import annotations

import numpy as np
import pytest

from qrunlearn.eval.mia import muse_auc, pair_wins, privleak


def test_auc_hand_built():
    # forget (label 0) scores and holdout (label 1) scores; a pair counts for the holdout text when its score is
    # LOWER (MUSE ranks by -score). Pairs (f, h): 3 forget x 2 holdout = 6.
    forget = np.array([1.0, 2.0, 3.0])
    holdout = np.array([2.0, 0.5])
    # h=2.0: lower than f=3.0 (win), tie with f=2.0 (half), above f=1.0 (loss) -> 1.5
    # h=0.5: lower than all three -> 3
    assert muse_auc(forget, holdout) == pytest.approx(4.5 / 6)


def test_auc_extremes_follow_muse_orientation():
    memorised_forget = np.array([0.1, 0.2, 0.3])  # low scores = high likelihood on the forget texts
    holdout = np.array([2.0, 3.0])
    assert muse_auc(memorised_forget, holdout) == 0.0
    assert muse_auc(holdout, memorised_forget) == 1.0


def test_pair_wins_mean_is_the_roc_auc():
    rng = np.random.default_rng(0)
    forget = rng.integers(0, 5, size=40).astype(float)  # many ties on purpose
    holdout = rng.integers(0, 5, size=30).astype(float)
    assert pair_wins(forget, holdout).mean() == pytest.approx(muse_auc(forget, holdout))


def test_privleak_formula_and_muse_news_reference():
    assert privleak(0.4772, 0.4772) == 0.0
    assert privleak(0.001, 0.4772) == pytest.approx(-99.79, abs=0.01)  # MUSE's target row: -99.8
    assert privleak(0.5, 0.25) == pytest.approx(100.0)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auc_equals_sklearns_roc_auc(seed, ties):
    """MUSE's own computation, `auc(*roc_curve(y, -score)[:2])`, on continuous scores and on heavily tied ones."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    forget, holdout = rng.normal(2.0, 1.0, size=333), rng.normal(2.3, 1.0, size=250)
    if ties:
        forget, holdout = np.round(forget, 1), np.round(holdout, 1)
    labels = np.concatenate([np.zeros(len(forget)), np.ones(len(holdout))])
    fpr, tpr, _ = metrics.roc_curve(labels, -np.concatenate([forget, holdout]))
    assert abs(muse_auc(forget, holdout) - metrics.auc(fpr, tpr)) < 1e-12


def test_auc_rejects_what_sklearn_rejects():
    with pytest.raises(ValueError, match="NaN"):
        muse_auc(np.array([1.0, np.nan]), np.array([2.0]))
    with pytest.raises(ValueError, match="both splits"):
        muse_auc(np.array([]), np.array([2.0]))
