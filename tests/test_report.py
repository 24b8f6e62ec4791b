"""The report's conclusions on hand-made cell results: precision-matched reversion, verdicts that need their
interval, rows over seeds, quantization-aware anchors, the counts and the diagnostics' correlations."""

from __future__ import annotations

import numpy as np
import pytest

from qrunlearn.eval.effect import Estimate
from qrunlearn.eval.items import ItemScores
from qrunlearn.quant.survival import FirstOrder, SurvivalOverall
from qrunlearn.report import (
    Measurement,
    anchor_precision,
    collect_rows,
    correlations,
    finding_sentence,
    first_order_predicts,
    pooled_reversions,
    prediction_sentence,
    rank_correlation,
    strategy_differences,
    strategy_findings,
    table_csv,
    table_markdown,
    transfer_lines,
)
from qrunlearn.results import (
    EvalRecord,
    Metrics,
    ReferenceCellResult,
    RetrainReference,
    SurvivalRecord,
    UnlearnCellResult,
    UnlearnSummary,
)
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.strategy import Strategy

N = 40  # forget questions: enough for the paired intervals to clear a threshold


def _eval(knowmem: np.ndarray, utility: float = 80.0) -> EvalRecord:
    items = ItemScores(knowmem_f=[float(v) for v in knowmem])
    return EvalRecord(metrics=Metrics(knowmem_f=float(np.mean(knowmem)), knowmem_r=utility), items=items)


def _survival(relative_error: float, predicted: float | None = None) -> SurvivalRecord:
    overall = SurvivalOverall(layers=1, numel=10, codes_changed_frac=0.5, projection=1.0, cosine=0.5,
                              mean_abs_dw=0.1, mean_abs_dw_in_steps=relative_error,
                              relative_error=relative_error, layers_below_half=0)
    first = None if predicted is None else FirstOrder(
        spec="nf4", layers=1, g_dw=1.0, g_dq=1.0 - predicted, g_dw_unquantized=0.0, g_target_shift=0.0,
        predicted_retained=1.0 - predicted, predicted_reversion=predicted)
    return SurvivalRecord(spec="nf4", verdict="", overall=overall, layers=[], first_order=first)


def _cell(method: str, strategy: str, evals: dict[str, EvalRecord], seed: int = 0,
          survival: dict[str, SurvivalRecord] | None = None) -> UnlearnCellResult:
    summary = UnlearnSummary(model_dir="m", adapter_dir=None, epochs_run=1, stopped_reason="", losses=[], epochs=[],
                             selected_epoch=None, seconds=1.0)
    return UnlearnCellResult(cell=f"{method}-{strategy}-s{seed}", method=method, strategy=strategy, seed=seed,
                             adapter="full", unlearn_config=UnlearnConfig(), unlearn=summary,
                             retrain_reference=RetrainReference(auc=0.5, knowmem_f=0.0, source="test"),
                             evals=evals, survival=survival or {})


RNG = np.random.default_rng(0)
TARGET_FP = RNG.uniform(70, 100, size=N)
# nf4 costs every model 10 points on every question
TARGET_NF4 = TARGET_FP - 10


def _references() -> ReferenceCellResult:
    retrain = np.zeros(N)
    return ReferenceCellResult(cell="references", target="t", retrain="r",
                               retrain_reference=RetrainReference(auc=0.5, knowmem_f=0.0, source="test"),
                               target_evals={"fp": _eval(TARGET_FP), "nf4": _eval(TARGET_NF4),
                                             "int8": _eval(TARGET_FP)},
                               retrain_evals={"fp": _eval(retrain), "nf4": _eval(retrain), "int8": _eval(retrain)})


def _measure(threshold: float = 0.25) -> Measurement:
    return Measurement(references=_references(), resamples=500, seed=0, threshold=threshold)


def _row(rows, group: str, precision: str):
    return next(r for r in rows if r.group == group and r.precision == precision)


def test_a_quantizer_that_lowers_every_model_equally_reverts_nothing():
    unlearned = TARGET_FP - 50
    cell = _cell("ga_gdr", "full", {"fp": _eval(unlearned), "nf4": _eval(unlearned - 10)})
    rows = collect_rows(_measure(), [cell], ["fp", "nf4"])
    nf4 = _row(rows, "ga_gdr-full", "nf4")
    assert nf4.effects is not None and nf4.effects.knowmem_f is not None
    share = nf4.effects.knowmem_f.reversion
    assert share is not None and share.value == pytest.approx(0.0, abs=1e-9)
    assert nf4.verdict == "holds"
    # the old fp-anchored figure (m_Q - m_fp) / (m_target - m_fp) read this as "forgot more": -0.2
    assert (np.mean(unlearned - 10) - np.mean(unlearned)) / (np.mean(TARGET_FP) - np.mean(unlearned)) < -0.19
    assert _row(rows, "ga_gdr-full", "fp").verdict == "anchor"


def test_hand_computed_reversion_and_verdicts():
    unlearned = TARGET_FP - 40
    gave_back_half = _cell("ga_gdr", "full", {"fp": _eval(unlearned), "nf4": _eval(TARGET_NF4 - 20)})
    no_effect = _cell("npo_gdr", "full", {"fp": _eval(TARGET_FP + RNG.normal(0, 1, N)),
                                          "nf4": _eval(TARGET_NF4 + RNG.normal(0, 1, N))})
    noisy = _cell("ga_klr", "full", {"fp": _eval(unlearned),
                                     "nf4": _eval(TARGET_NF4 - 30 + RNG.normal(0, 25, N))})
    rows = collect_rows(_measure(), [gave_back_half, no_effect, noisy], ["fp", "nf4"])
    half = _row(rows, "ga_gdr-full", "nf4")
    assert half.effects is not None and half.effects.knowmem_f is not None
    assert half.effects.knowmem_f.effect.value == pytest.approx(20.0)
    assert half.effects.knowmem_f.reversion is not None
    assert half.effects.knowmem_f.reversion.value == pytest.approx(0.5)
    assert half.verdict == "reverted"
    assert _row(rows, "npo_gdr-full", "nf4").verdict == "no effect"
    assert _row(rows, "ga_klr-full", "nf4").verdict == "inconclusive"
    # the retrain model scores 0 everywhere: the gap is the unlearned model's KnowMem at that precision
    gap = half.effects.knowmem_f.retrain_gap
    assert gap is not None and gap.value == pytest.approx(np.mean(TARGET_NF4 - 20))

    findings = strategy_findings(rows, ["full"], ["fp", "nf4"])
    assert len(findings) == 1
    found = findings[0]
    assert (found.groups, found.measurable, found.reverted, found.holds, found.inconclusive) == (3, 2, 1, 0, 1)
    sentence = finding_sentence(findings, "nf4", 0.25)
    assert "1 of 2 rows with a measurable effect reverted" in sentence and "1 inconclusive" in sentence
    assert "(1 without a measurable effect)" in sentence
    table = table_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "0.50 [" in table and "| reverted |" in table
    assert "knowmem_f_reversion_low" in table_csv(rows).splitlines()[0]


def test_seeds_make_one_row_with_the_mean():
    cells = [_cell("ga_gdr", "full", {"fp": _eval(TARGET_FP - shift), "nf4": _eval(TARGET_NF4 - shift)}, seed=seed)
             for seed, shift in ((0, 30.0), (1, 50.0))]
    rows = collect_rows(_measure(), cells, ["fp", "nf4"])
    fp = _row(rows, "ga_gdr-full", "fp")
    assert fp.seeds == [0, 1] and fp.cells == ["ga_gdr-full-s0", "ga_gdr-full-s1"]
    assert fp.metrics.knowmem_f == pytest.approx(np.mean(TARGET_FP) - 40.0)
    assert fp.effects is not None and fp.effects.knowmem_f is not None
    assert fp.effects.knowmem_f.effect.value == pytest.approx(40.0)
    assert len([r for r in rows if r.group]) == 2  # one row per precision, not per seed


def test_a_quantization_aware_row_is_judged_where_it_is_deployed():
    assert anchor_precision(Strategy.parse("qat:nf4"), ["fp", "int8", "nf4"]) == "nf4"
    assert anchor_precision(Strategy.parse("lora"), ["fp", "int8", "nf4"]) == "fp"
    assert anchor_precision(Strategy.parse("qat:rtn:w4g64"), ["fp", "nf4"]) is None
    deployed = TARGET_NF4 - 40
    cell = _cell("ga_gdr", "qat:nf4", {"fp": _eval(TARGET_FP - 60), "nf4": _eval(deployed),
                                       "int8": _eval(TARGET_FP - 20)})
    rows = collect_rows(_measure(), [cell], ["fp", "int8", "nf4"])
    fp = _row(rows, "ga_gdr-qat_nf4", "fp")
    assert not fp.deployed and fp.verdict == "not deployed"
    assert fp.effects is not None and fp.effects.knowmem_f is not None and fp.effects.knowmem_f.reversion is None
    assert _row(rows, "ga_gdr-qat_nf4", "nf4").verdict == "anchor"
    int8 = _row(rows, "ga_gdr-qat_nf4", "int8")
    assert int8.anchor == "nf4"
    assert int8.effects is not None and int8.effects.knowmem_f is not None
    assert int8.effects.knowmem_f.reversion is not None
    assert int8.effects.knowmem_f.reversion.value == pytest.approx(0.5)  # 20 of nf4's 40 points kept at int8
    assert "(not deployed)" in table_markdown(rows)
    # the report's transfer paragraph: the QAT cell at the quantizers it was not trained for, with the verdict
    lines = transfer_lines(rows, [Strategy.parse("full"), Strategy.parse("qat:nf4")])
    assert len(lines) == 1 and lines[0].startswith("- qat:nf4 (anchored at nf4, where it is deployed)")
    assert "ga_gdr at int8 0.50 [" in lines[0] and lines[0].endswith("(reverted)")
    assert "at fp" not in lines[0]  # the fp model is never deployed


def test_each_strategy_against_full_fine_tuning_paired_over_items():
    """Full FT gives back half its 40 points at nf4, LoRA none of its 30; QAT is anchored at nf4 (no difference
    there) and compared at int8; a method without a full cell has no baseline."""
    full = _cell("ga_gdr", "full", {"fp": _eval(TARGET_FP - 40), "nf4": _eval(TARGET_NF4 - 20),
                                    "int8": _eval(TARGET_FP - 40)})
    lora = _cell("ga_gdr", "lora", {"fp": _eval(TARGET_FP - 30), "nf4": _eval(TARGET_NF4 - 30),
                                    "int8": _eval(TARGET_FP - 30)})
    qat = _cell("ga_gdr", "qat:nf4", {"fp": _eval(TARGET_FP - 60), "nf4": _eval(TARGET_NF4 - 40),
                                      "int8": _eval(TARGET_FP - 10)})
    orphan = _cell("npo_gdr", "lora", {"fp": _eval(TARGET_FP - 30), "nf4": _eval(TARGET_NF4 - 30)})
    found = strategy_differences(_measure(), [full, lora, qat, orphan], ["fp", "int8", "nf4"])
    by_key = {(d.strategy, d.precision): d for d in found}
    assert sorted(by_key) == [("lora", "int8"), ("lora", "nf4"), ("qat:nf4", "int8")]
    nf4 = by_key[("lora", "nf4")].knowmem_f
    assert nf4 is not None and nf4.value == pytest.approx(-0.5) and nf4.high is not None and nf4.high < 0
    int8 = by_key[("lora", "int8")].knowmem_f
    assert int8 is not None and int8.value == pytest.approx(0.0, abs=1e-9)
    transfer = by_key[("qat:nf4", "int8")].knowmem_f  # QAT keeps 10 of its 40 nf4 points at int8: reversion 0.75
    assert transfer is not None and transfer.value == pytest.approx(0.75)
    assert by_key[("lora", "nf4")].knowmem_f_answer_nll is None  # these items hold no answer NLLs


def test_each_strategy_pooled_over_the_methods_and_against_full_fine_tuning():
    """Full FT: GA gives back 20 of its 40 nf4 points, NPO none of its 20: 20 of the 60 summed, reversion 1/3.
    LoRA gives back nothing in either method: pooled difference -1/3. A single method pools nothing."""
    cells = [
        _cell("ga_gdr", "full", {"fp": _eval(TARGET_FP - 40), "nf4": _eval(TARGET_NF4 - 20)}),
        _cell("npo_gdr", "full", {"fp": _eval(TARGET_FP - 20), "nf4": _eval(TARGET_NF4 - 20)}),
        _cell("ga_gdr", "lora", {"fp": _eval(TARGET_FP - 30), "nf4": _eval(TARGET_NF4 - 30)}),
        _cell("npo_gdr", "lora", {"fp": _eval(TARGET_FP - 10), "nf4": _eval(TARGET_NF4 - 10)}),
        _cell("ga_gdr", "qat:nf4", {"fp": _eval(TARGET_FP - 60), "nf4": _eval(TARGET_NF4 - 40)}),
    ]
    rows = collect_rows(_measure(), cells, ["fp", "nf4"])
    pooled, differences = pooled_reversions(_measure(), cells, ["fp", "nf4"], rows)
    by_strategy = {p.strategy: p for p in pooled}
    assert sorted(by_strategy) == ["full", "lora"]  # QAT: one method, and nf4 is its anchor
    full = by_strategy["full"]
    assert full.methods == ["ga_gdr", "npo_gdr"] and full.runs == 2 and full.precision == "nf4"
    assert full.knowmem_f is not None and full.knowmem_f.value == pytest.approx(1 / 3)
    assert full.knowmem_f.low is not None and full.knowmem_f.high is not None
    assert full.knowmem_f.low < 1 / 3 < full.knowmem_f.high
    lora = by_strategy["lora"].knowmem_f
    assert lora is not None and lora.value == pytest.approx(0.0, abs=1e-9)
    [difference] = differences
    assert (difference.method, difference.methods, difference.strategy) == ("pooled", ["ga_gdr", "npo_gdr"], "lora")
    assert full.at_retrain == [] and difference.at_retrain == []
    sentence = finding_sentence(strategy_findings(rows, ["full", "lora", "qat:nf4"], ["fp", "nf4"]), "nf4", 0.25,
                                pooled)
    assert "full pooled over 2 methods (2 runs): KnowMem-forget reversion 0.33 [" in sentence
    assert "lora pooled over 2 methods (2 runs): KnowMem-forget reversion 0.00 [0.00, 0.00], holds" in sentence
    unmeasured = pooled[0].model_copy(update={"knowmem_f": None})
    assert "reversion none (the summed forgetting is not measurable" in finding_sentence(
        strategy_findings(rows, ["full"], ["fp", "nf4"]), "nf4", 0.25, [unmeasured])
    assert difference.knowmem_f is not None and difference.knowmem_f.value == pytest.approx(-1 / 3)
    assert difference.knowmem_f.high is not None and difference.knowmem_f.high < 0


def test_a_method_at_the_floor_is_left_out_of_the_pooled_knowmem_figure():
    """GA forgets every answer at every precision (the retrain model's 0): at nf4 it keeps only the 75 of 85 points
    the quantizer leaves the target. Pooled with NPO (gives back 20 of its 40) that floor would read as reversion:
    1 - (75 + 20) / (85 + 40) = 0.24. GA is left out and named; NPO alone gives back 0.5. The NLL metrics have no
    floor, and LoRA beside full is compared over the methods at retrain on neither side."""
    floor = np.zeros(N)
    cells = [
        _cell("ga_gdr", "full", {"fp": _eval(floor), "nf4": _eval(floor)}),
        _cell("npo_gdr", "full", {"fp": _eval(TARGET_FP - 40), "nf4": _eval(TARGET_NF4 - 20)}),
        _cell("ga_gdr", "lora", {"fp": _eval(floor), "nf4": _eval(floor)}),
        _cell("npo_gdr", "lora", {"fp": _eval(TARGET_FP - 40), "nf4": _eval(TARGET_NF4 - 40)}),
    ]
    rows = collect_rows(_measure(), cells, ["fp", "nf4"])
    assert _row(rows, "ga_gdr-full", "nf4").verdict == "at retrain"
    assert _row(rows, "npo_gdr-full", "nf4").verdict == "reverted"
    pooled, [difference] = pooled_reversions(_measure(), cells, ["fp", "nf4"], rows)
    full = next(p for p in pooled if p.strategy == "full")
    assert full.methods == ["ga_gdr", "npo_gdr"] and full.at_retrain == ["ga_gdr"]
    assert full.knowmem_f is not None and full.knowmem_f.value == pytest.approx(0.5)
    assert difference.at_retrain == ["ga_gdr"] and difference.methods == ["ga_gdr", "npo_gdr"]
    assert difference.knowmem_f is not None and difference.knowmem_f.value == pytest.approx(-0.5)
    lora = next(p for p in pooled if p.strategy == "lora")
    sentence = finding_sentence(strategy_findings(rows, ["full", "lora"], ["fp", "nf4"]), "nf4", 0.25, pooled)
    assert "full pooled over 2 methods (2 runs): KnowMem-forget reversion 0.50 [" in sentence
    assert "ga_gdr at the retrain model's level, left out" in sentence
    every = lora.model_copy(update={"at_retrain": ["ga_gdr", "npo_gdr"], "knowmem_f": None})
    assert "reversion none (every method at the retrain model's level)" in finding_sentence(
        strategy_findings(rows, ["lora"], ["fp", "nf4"]), "nf4", 0.25, [every])


def test_rows_without_items_have_no_interval_and_no_verdict():
    bare = {name: EvalRecord(metrics=Metrics(knowmem_f=50.0)) for name in ("fp", "nf4")}
    rows = collect_rows(_measure(), [_cell("ga_gdr", "full", bare)], ["fp", "nf4"])
    nf4 = _row(rows, "ga_gdr-full", "nf4")
    assert nf4.effects is not None and nf4.effects.knowmem_f is None and nf4.verdict == "no items"
    sentence = finding_sentence(strategy_findings(rows, ["full"], ["fp", "nf4"]), "nf4", 0.25)
    assert "0 of 0 rows with a measurable effect" in sentence and "1 without per-item scores" in sentence


def test_rank_correlation_interval():
    xs = list(range(12))
    strong = rank_correlation(xs, [2 * x + 1 for x in xs])
    assert strong.value == pytest.approx(1.0) and strong.low is not None and strong.low > 0.9
    rng = np.random.default_rng(4)
    weak = rank_correlation(xs, list(rng.permutation(12)))
    assert weak.low is not None and weak.high is not None and weak.low < 0 < weak.high
    assert rank_correlation([1, 2], [3, 4]).value is None  # too few pairs
    assert rank_correlation([1, 1, 1, 1], [1, 2, 3, 4]).value is None  # constant side


def test_correlations_over_cells_and_the_prediction_sentence():
    cells = []
    for i, back in enumerate(np.linspace(0, 35, 8)):  # each cell gives back more of its 40 points at nf4
        unlearned = TARGET_FP - 40
        cells.append(_cell(f"m{i}", "full", {"fp": _eval(unlearned), "nf4": _eval(unlearned - 10 + back)},
                           survival={"nf4": _survival(float(back) / 40 + 0.01 * i)}))
    found = correlations(_measure(), cells, ["fp", "nf4"])
    relative = next(c for c in found if c.diagnostic == "relative_error" and c.target == "knowmem_f")
    assert relative.pairs == 8 and relative.predicts and relative.rho.value == pytest.approx(1.0)
    assert "relative_error vs knowmem_f" in prediction_sentence(found)
    assert not first_order_predicts(found)  # no first-order values in these cells: nothing printed
    shuffled = [_cell(c.method, "full", c.evals, survival={"nf4": _survival(v, predicted=v)})
                for c, v in zip(cells, [0.3, 0.1, 0.8, 0.2, 0.5, 0.9, 0.4, 0.6])]
    none = correlations(_measure(), shuffled, ["fp", "nf4"])
    assert not any(c.predicts for c in none)
    assert prediction_sentence(none).startswith("No diagnostic predicts")
    rows = collect_rows(_measure(), shuffled, ["fp", "nf4"])
    assert "predicted reversion" not in table_markdown(rows, predicted=first_order_predicts(none))


def test_a_correlation_that_only_ranks_the_quantizers_is_said_to_be_one():
    """int8 changes more (diagnostic 2.0-2.9) and gives back little (0-4 of 40 points), nf4 changes less
    (0.1-0.9) and gives back much (20-34): pooled over both quantizers the diagnostic "predicts" (rho far below 0),
    but within each quantizer it is shuffled against the reversion, so it ranks the quantizers, not the cells."""
    order = [0.3, 0.1, 0.8, 0.2, 0.5, 0.9, 0.4, 0.6]
    cells = []
    for i, shuffled in enumerate(order):
        unlearned = TARGET_FP - 40
        evals = {"fp": _eval(unlearned), "int8": _eval(unlearned + i / 2), "nf4": _eval(TARGET_NF4 - 20 + 2 * i)}
        cells.append(_cell(f"m{i}", "full", evals, survival={"int8": _survival(2.0 + shuffled),
                                                             "nf4": _survival(shuffled)}))
    found = correlations(_measure(), cells, ["fp", "int8", "nf4"])
    pooled = next(c for c in found if c.diagnostic == "relative_error" and c.target == "knowmem_f"
                  and c.precision is None)
    assert pooled.pairs == 16 and pooled.predicts and pooled.rho.value is not None and pooled.rho.value < -0.6
    within = [c for c in found if c.diagnostic == "relative_error" and c.target == "knowmem_f" and c.precision]
    assert [(c.precision, c.pairs) for c in within] == [("int8", 8), ("nf4", 8)]
    assert not any(c.predicts for c in within)
    sentence = prediction_sentence(found)
    assert "relative_error vs knowmem_f rho -0." in sentence
    assert "Within one quantizer none does" in sentence
    one_quantizer = correlations(_measure(), cells, ["fp", "nf4"])
    assert all(c.precision is None for c in one_quantizer)  # nothing to separate


def test_rows_at_the_floor_are_not_pairs_of_the_knowmem_correlation():
    """Cells that forgot every answer (the retrain's 0) at every precision read a precision-matched share of 10/85
    at nf4, the target's own loss: with the largest updates (diagnostic 2.0-2.2) and a middling "reversion", three
    such cells would wash the eight measured cells' rank correlation of +1 out (to 0.03 [-0.60, 0.63] as pairs)."""
    cells = []
    for i, back in enumerate(np.linspace(0, 35, 8)):
        unlearned = TARGET_FP - 40
        cells.append(_cell(f"m{i}", "full", {"fp": _eval(unlearned), "nf4": _eval(unlearned - 10 + back)},
                           survival={"nf4": _survival(float(back) / 40 + 0.01 * i)}))
    floored = [_cell(f"ga{i}", "full", {"fp": _eval(np.zeros(N)), "nf4": _eval(np.zeros(N))},
                     survival={"nf4": _survival(2.0 + 0.1 * i)}) for i in range(3)]
    rows = collect_rows(_measure(), floored, ["fp", "nf4"])
    assert {r.verdict for r in rows if r.group and r.precision == "nf4"} == {"at retrain"}
    found = correlations(_measure(), cells + floored, ["fp", "nf4"])
    relative = next(c for c in found if c.diagnostic == "relative_error" and c.target == "knowmem_f")
    assert relative.pairs == 8 and relative.rho.value == pytest.approx(1.0)


def test_the_first_order_prediction_is_printed_once_it_predicts():
    cells = []
    for i, back in enumerate(np.linspace(0, 35, 8)):
        unlearned = TARGET_FP - 40
        cells.append(_cell(f"m{i}", "full", {"fp": _eval(unlearned), "nf4": _eval(unlearned - 10 + back)},
                           survival={"nf4": _survival(0.5, predicted=float(back) / 40)}))
    found = correlations(_measure(), cells, ["fp", "nf4"])
    assert first_order_predicts(found)
    rows = collect_rows(_measure(), cells, ["fp", "nf4"])
    table = table_markdown(rows, predicted=True)
    assert "predicted answer-NLL reversion (1st order)" in table and "| 0.88 |" in table  # 35 / 40


def test_estimate_sides():
    assert Estimate(value=1.0, low=0.5, high=2.0).excludes(0.25) == "above"
    assert Estimate(value=0.0, low=-0.1, high=0.1).excludes(0.25) == "below"
    assert Estimate(value=0.2, low=0.1, high=0.3).excludes(0.25) is None
