"""Seeded percentile bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from qrunlearn.eval.bootstrap import auc_samples, mean_interval, percentile_interval
from qrunlearn.eval.mia import muse_auc


def test_mean_interval_brackets_the_mean_and_is_reproducible():
    values = np.array([0.0, 10.0, 20.0, 30.0, 40.0, 100.0])
    low, high = mean_interval(values, 2000, seed=1)
    assert low < values.mean() < high
    assert 0.0 <= low and high <= 100.0
    assert mean_interval(values, 2000, seed=1) == (low, high)
    assert mean_interval(values, 2000, seed=2) != (low, high)


def test_mean_interval_of_a_constant_is_a_point():
    assert mean_interval(np.full(7, 42.0), 100, seed=0) == (42.0, 42.0)


def test_auc_samples_centre_on_the_auc():
    rng = np.random.default_rng(0)
    forget, holdout = rng.normal(0, 1, 50), rng.normal(-0.5, 1, 60)
    samples = auc_samples(forget, holdout, 3000, seed=0)
    low, high = percentile_interval(samples)
    auc = muse_auc(forget, holdout)
    assert low < auc < high
    assert samples.mean() == pytest.approx(auc, abs=0.01)


def test_auc_samples_of_separated_scores_are_exact():
    samples = auc_samples(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0]), 200, seed=0)
    assert np.all(samples == 1.0)
