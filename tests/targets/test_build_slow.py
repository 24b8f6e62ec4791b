"""The long end-to-end check of the built-in benchmark (`make test-all`; ~3.5 minutes on 2 cores): the default
recipe's target knows the forget facts through MUSE's 10-shot KnowMem prompt and the retrain does not."""

from __future__ import annotations

import pytest

from qrunlearn.data.muse import load_corpus, write_corpus
from qrunlearn.data.synth import SynthConfig, generate_corpus
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.eval.muse import exact_match
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.targets.build import TargetConfig, build_target_and_retrain


@pytest.mark.slow
def test_default_target_knows_forget_facts_and_retrain_does_not(tmp_path):
    write_corpus(generate_corpus(SynthConfig(seed=0, size="small")), tmp_path / "data")
    corpus = load_corpus(tmp_path / "data")
    build_target_and_retrain(tmp_path / "data", tmp_path / "models", TargetConfig(), progress=False)
    config = EvalConfig(metrics=("knowmem_f", "knowmem_r", "privleak"), batch_size=64, bootstrap=10)
    scores = {}
    for name in ("target", "retrain"):
        model, tokenizer = load_causal_lm(tmp_path / "models" / name, device="cpu")
        result = evaluate(model, tokenizer, corpus, config, progress=False)
        scores[name] = (exact_match(result.items, "knowmem_f"), result.metrics)
    target_em, target = scores["target"]
    retrain_em, retrain = scores["retrain"]
    # measured 0.84 / 0.03 (benchmarks/RESULTS.md); the aim in the issue is >= 0.8 for the target
    assert target_em >= 0.8, target_em
    assert retrain_em <= 0.1, retrain_em
    # the retrain never saw the forget people: its forget NLL sits near its holdout NLL, far above the target's
    assert target["nll_privleak_forget"] < 0.2 < retrain["nll_privleak_forget"]
    assert abs(retrain["nll_privleak_forget"] - retrain["nll_privleak_holdout"]) < 0.5
