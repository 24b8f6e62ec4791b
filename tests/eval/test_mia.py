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
