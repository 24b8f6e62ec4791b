"""The precision-matched effect, its paired intervals over items and seeds, and the verdict drawn from them."""

from __future__ import annotations

import numpy as np
import pytest

from qrunlearn.errors import UserError
from qrunlearn.eval.effect import (
    METRIC,
    Arm,
    Estimate,
    draw,
    pooled_reversion,
    precision_effect,
    reversion_difference,
    statistic,
    verdict,
)
from qrunlearn.eval.items import ItemScores
from qrunlearn.eval.mia import muse_auc

KNOWMEM = METRIC["knowmem_f"]


def _k(values) -> ItemScores:
    return ItemScores(knowmem_f=[float(v) for v in values])


def test_hand_computed_share():
    # 10 copies of 4 questions: enough items for the forgetting's interval to exclude 0
    target_fp, unlearned_fp = _k([100, 100, 0, 100] * 10), _k([0, 0, 0, 100] * 10)  # 75 -> 25: effect 50
    target_q, unlearned_q = _k([100, 0, 0, 100] * 10), _k([0, 0, 0, 50] * 10)  # 50 -> 12.5: effect 37.5
    found = precision_effect(KNOWMEM, target_q, [unlearned_q], target_fp, [unlearned_fp], resamples=200)
    assert found.effect.value == pytest.approx(37.5)
    assert found.retained is not None and found.reversion is not None
    assert found.retained.value == pytest.approx(0.75)
    assert found.reversion.value == pytest.approx(0.25)
    anchor = precision_effect(KNOWMEM, target_fp, [unlearned_fp], resamples=200)
    assert anchor.effect.value == pytest.approx(50.0) and anchor.reversion is None


def test_a_quantizer_that_lowers_every_model_equally_gives_nothing_back():
    rng = np.random.default_rng(0)
    target_fp = rng.uniform(60, 100, size=40)
    unlearned_fp = target_fp - rng.uniform(20, 40, size=40)
    target_q, unlearned_q = target_fp - 10, unlearned_fp - 10
    found = precision_effect(KNOWMEM, _k(target_q), [_k(unlearned_q)], _k(target_fp), [_k(unlearned_fp)])
    assert found.reversion is not None
    assert found.reversion.value == pytest.approx(0.0, abs=1e-12)
    # paired: every resample sees the same shift in both models, so the interval is a point
    assert found.reversion.low == pytest.approx(0.0, abs=1e-9) and found.reversion.high == pytest.approx(0.0, abs=1e-9)
    # the old fp-anchored figure (m_Q - m_fp) / (m_target - m_fp) read this as "forgot more"
    old = (unlearned_q.mean() - unlearned_fp.mean()) / (target_fp.mean() - unlearned_fp.mean())
    assert old < -0.2


def _correlated_items(rng, n=60, shift=5.0):
    difficulty = rng.normal(50, 20, size=n)  # shared by both models: what pairing cancels
    target = difficulty + rng.normal(0, 2, size=n)
    unlearned = difficulty - shift + rng.normal(0, 2, size=n)
    return target, unlearned


def test_paired_interval_covers_a_known_difference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    covered, paired_widths, unpaired_widths = 0, [], []
    for trial in range(40):
        target, unlearned = _correlated_items(rng)
        found = precision_effect(KNOWMEM, _k(target), [_k(unlearned)], resamples=400, seed=trial)
        low, high = found.effect.low, found.effect.high
        assert low is not None and high is not None
        covered += low <= 5.0 <= high
        paired_widths.append(high - low)
        # unpaired: each model's items resampled on their own
        picks_t = rng.integers(0, len(target), size=(400, len(target)))
        picks_u = rng.integers(0, len(target), size=(400, len(target)))
        diffs = target[picks_t].mean(axis=1) - unlearned[picks_u].mean(axis=1)
        unpaired_widths.append(np.percentile(diffs, 97.5) - np.percentile(diffs, 2.5))
    # the true difference is 5 in expectation; a 95% interval covers it in most of 40 trials
    assert covered >= 34
    assert np.median(paired_widths) < 0.3 * np.median(unpaired_widths)


def test_seeds_widen_the_interval_and_average_the_effect():
    rng = np.random.default_rng(2)
    target, unlearned = _correlated_items(rng)
    one = precision_effect(KNOWMEM, _k(target), [_k(unlearned)], resamples=500)
    same = precision_effect(KNOWMEM, _k(target), [_k(unlearned)] * 3, resamples=500)
    assert same.effect.value == pytest.approx(one.effect.value)
    spread = [_k(unlearned + offset) for offset in (-4.0, 0.0, 4.0)]
    seeds = precision_effect(KNOWMEM, _k(target), spread, resamples=500)
    assert seeds.effect.value == pytest.approx(one.effect.value)  # mean over seeds
    assert (seeds.effect.high - seeds.effect.low) > 1.5 * (same.effect.high - same.effect.low)


def test_statistics_equal_the_metrics_definitions():
    rng = np.random.default_rng(3)
    forget, holdout = rng.normal(2, 1, 30), rng.normal(3, 1, 25)
    sums, tokens = rng.uniform(10, 100, 30), rng.integers(5, 50, 30)
    scores = ItemScores(privleak_forget=list(forget), privleak_holdout=list(holdout), forget_nll_sum=list(sums),
                        forget_tokens=[int(t) for t in tokens])
    ones = {"privleak_forget": np.ones((1, 30)), "privleak_holdout": np.ones((1, 25))}
    assert statistic(METRIC["privleak_auc"], scores, ones)[0] == pytest.approx(muse_auc(forget, holdout))
    assert statistic(METRIC["nll_privleak_forget"], scores, ones)[0] == pytest.approx(sums.sum() / tokens.sum())
    # a resample that draws the first text twice and drops the second weighs it twice
    weights = {"privleak_forget": np.array([[2.0, 0.0, *([1.0] * 28)]])}
    expected = (2 * sums[0] + sums[2:].sum()) / (2 * tokens[0] + tokens[2:].sum())
    assert statistic(METRIC["nll_privleak_forget"], scores, weights)[0] == pytest.approx(expected)


def test_the_auc_effect_points_the_forgetting_way():
    # target: forget texts score far below holdout (memorised, AUC 0); unlearned: mixed (AUC 0.5)
    target = ItemScores(privleak_forget=[0.1, 0.2, 0.3, 0.4], privleak_holdout=[5.0, 6.0, 7.0, 8.0])
    unlearned = ItemScores(privleak_forget=[5.5, 0.2, 6.5, 0.4], privleak_holdout=[5.0, 6.0, 7.0, 0.3])
    found = precision_effect(METRIC["privleak_auc"], target, [unlearned], resamples=100)
    assert found.effect.value == pytest.approx(muse_auc([5.5, 0.2, 6.5, 0.4], [5.0, 6.0, 7.0, 0.3]) - 0.0)
    assert found.effect.value > 0


def test_draws_are_reproducible():
    a = draw({"knowmem_f": 10, "verbmem": 5}, 3, 50, seed=7)
    b = draw({"verbmem": 5, "knowmem_f": 10}, 3, 50, seed=7)
    assert np.array_equal(a.counts["knowmem_f"], b.counts["knowmem_f"]) and np.array_equal(a.seeds, b.seeds)
    assert (a.counts["knowmem_f"].sum(axis=1) == 10).all()


def test_models_with_different_items_are_refused():
    with pytest.raises(UserError, match="different items"):
        precision_effect(KNOWMEM, _k([1, 2, 3]), [_k([1, 2])])


def test_no_share_of_a_forgetting_whose_interval_reaches_zero():
    rng = np.random.default_rng(5)
    target = rng.uniform(50, 100, size=30)
    noise = rng.normal(0, 10, size=30)  # unlearning moved the items both ways: mean about 0
    found = precision_effect(KNOWMEM, _k(target), [_k(target + noise)], _k(target), [_k(target + noise - 1)])
    assert found.effect.value is not None and found.retained is None and found.reversion is None


def test_retrain_gap():
    found = precision_effect(KNOWMEM, _k([90, 80]), [_k([30, 20])], retrain=_k([10, 0]), resamples=50)
    assert found.retrain_gap is not None and found.retrain_gap.value == pytest.approx(20.0)


@pytest.mark.parametrize("anchor, share, expected", [
    (Estimate(value=30, low=10, high=50), Estimate(value=0.8, low=0.5, high=1.0), "reverted"),
    (Estimate(value=30, low=10, high=50), Estimate(value=0.0, low=-0.1, high=0.1), "holds"),
    (Estimate(value=30, low=10, high=50), Estimate(value=0.2, low=-0.1, high=0.6), "inconclusive"),
    (Estimate(value=30, low=10, high=50), Estimate(value=0.2), "inconclusive"),  # no interval: no verdict
    (Estimate(value=5, low=-2, high=12), Estimate(value=0.9, low=0.8, high=1.0), "no effect"),
    (Estimate(value=5), None, "no items"),
])
def test_verdicts_only_where_the_interval_clears_the_threshold(anchor, share, expected):
    assert verdict(anchor, share, threshold=0.25) == expected


@pytest.mark.parametrize("gap, expected", [
    (Estimate(value=-0.7, low=-2.1, high=0.0), "at retrain"),  # knows no more than the retrain at Q
    (Estimate(value=0.0, low=0.0, high=0.0), "at retrain"),
    (Estimate(value=1.4, low=-0.7, high=3.6), "reverted"),  # may know more: the share decides
    (Estimate(value=-0.7), "reverted"),  # no interval: no claim
])
def test_at_retrain_only_where_the_whole_gap_interval_is_on_the_forgetting_side(gap, expected):
    anchor, share = Estimate(value=30, low=10, high=50), Estimate(value=0.8, low=0.5, high=1.0)
    assert verdict(anchor, share, threshold=0.25, retrain_gap=gap) == expected


def test_a_floored_model_beside_a_target_that_quantization_lowers_is_at_retrain_not_reverted():
    """Hand-computed: the unlearned model answers none of 100 questions at fp and at Q, the target 100 at fp and 80
    at Q, the retrain none at Q: the precision-matched reversion is 1 - 80/100 = 0.2 with not one answer come back."""
    target_a, target_q = [100.0] * 100, [100.0] * 80 + [0.0] * 20
    floored = [0.0] * 100
    found = precision_effect(KNOWMEM, _k(target_q), [_k(floored)], _k(target_a), [_k(floored)], retrain=_k(floored),
                             resamples=200)
    assert found.reversion is not None and found.reversion.value == pytest.approx(0.2)
    assert found.retrain_gap == Estimate(value=0.0, low=0.0, high=0.0)
    anchor = Estimate(value=100.0, low=100.0, high=100.0)
    assert verdict(anchor, found.reversion, threshold=0.1) == "reverted"  # the share alone would say so
    assert verdict(anchor, found.reversion, threshold=0.1, retrain_gap=found.retrain_gap) == "at retrain"


def _arm(target_q, unlearned_q, target_a, unlearned_a) -> Arm:
    return Arm(target_q=_k(target_q), unlearned_q=[_k(u) for u in unlearned_q], target_anchor=_k(target_a),
               unlearned_anchor=[_k(u) for u in unlearned_a])


def test_reversion_difference_between_two_strategies():
    target = [100, 100, 100, 100] * 10
    # the baseline forgets every question at the anchor and gets half of them back at Q: reversion 0.5
    baseline = _arm(target, [[0, 100, 0, 100] * 10], target, [[0, 0, 0, 0] * 10])
    # the other strategy forgets the same questions and keeps all of them at Q: reversion 0
    other = _arm(target, [[0, 0, 0, 0] * 10], target, [[0, 0, 0, 0] * 10])
    found = reversion_difference(KNOWMEM, [baseline], [other], resamples=500)
    assert found is not None and found.value == pytest.approx(-0.5)
    assert found.low is not None and found.high is not None and found.low <= -0.5 <= found.high < 0
    assert reversion_difference(KNOWMEM, [other], [baseline], resamples=500).value == pytest.approx(0.5)


def test_a_strategy_against_itself_differs_by_exactly_zero_under_paired_items():
    rng = np.random.default_rng(3)
    target = rng.uniform(60, 100, size=40)
    unlearned_a, unlearned_q = target - rng.uniform(20, 60, size=40), target - rng.uniform(0, 60, size=40)
    arm = _arm(target, [unlearned_q], target, [unlearned_a])
    found = reversion_difference(KNOWMEM, [arm], [arm], resamples=300)
    assert found is not None and (found.value, found.low, found.high) == (0.0, 0.0, 0.0)


def test_no_difference_when_an_anchor_forgetting_is_not_measurable():
    target = [100, 100, 100, 100] * 10
    forgets = _arm(target, [[0, 100, 0, 100] * 10], target, [[0, 0, 0, 0] * 10])
    nothing = _arm(target, [target], target, [target])  # no forgetting at its anchor
    assert reversion_difference(KNOWMEM, [forgets], [nothing], resamples=200) is None


def test_pooled_reversion_is_the_share_of_the_summed_forgetting():
    """Two methods of one strategy: one forgets 10 questions of 40 and gives all of them back at Q, the other
    forgets 30 and keeps them: the quantizer gives back 10 of the 40 forgotten, 0.25 (the mean of the two methods'
    reversions would say 0.5)."""
    target = [100] * 40
    gives_back = _arm(target, [target], target, [[0] * 10 + [100] * 30])
    keeps = _arm(target, [[0] * 30 + [100] * 10], target, [[0] * 30 + [100] * 10])
    found = pooled_reversion(KNOWMEM, [gives_back, keeps], resamples=500)
    assert found is not None and found.value == pytest.approx(0.25)
    assert found.low is not None and found.high is not None and found.low < 0.25 < found.high
    # pooled over the two, against each alone: the same items behind one interval, per arm exactly its own share
    assert pooled_reversion(KNOWMEM, [gives_back], resamples=500).value == pytest.approx(1.0)
    assert pooled_reversion(KNOWMEM, [keeps], resamples=500).value == pytest.approx(0.0)
    # a pooled difference: a strategy that keeps everything in both methods gives back 0.25 less
    kept = _arm(target, [[0] * 10 + [100] * 30], target, [[0] * 10 + [100] * 30])
    difference = reversion_difference(KNOWMEM, [gives_back, keeps], [kept, keeps], resamples=500)
    assert difference is not None and difference.value == pytest.approx(-0.25)


def test_pooled_reversion_over_one_arm_is_the_rows_reversion():
    """One arm, several seeds: the same draws as `precision_effect`, so the same estimate and interval."""
    rng = np.random.default_rng(5)
    target = rng.uniform(60, 100, size=30)
    seeds_a = [target - rng.uniform(20, 60, size=30) for _ in range(3)]
    seeds_q = [a + rng.uniform(0, 20, size=30) for a in seeds_a]
    row = precision_effect(KNOWMEM, _k(target), [_k(u) for u in seeds_q], _k(target), [_k(u) for u in seeds_a],
                           resamples=400, seed=2)
    pooled = pooled_reversion(KNOWMEM, [_arm(target, seeds_q, target, seeds_a)], resamples=400, seed=2)
    assert row.reversion is not None and pooled == row.reversion
