"""The strategies against quantization undoing unlearning (SURE, QUAIL, quantization-aware), run through the recipe:
each lowers its loss, each does what defines it, and bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from qrunlearn.cli import main
from qrunlearn.errors import UserError
from qrunlearn.quant import parse_spec, quantize_weight
from qrunlearn.unlearn import UnlearnConfig, unlearn
from qrunlearn.unlearn.strategy import parse_strategy, strategy_settings


def _cfg(**changes) -> UnlearnConfig:
    base = dict(method="ga", reg="gdr", adapter="full", lr=1e-3, epochs=2, batch_size=8, grad_accum=1,
                max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0, seed=0)
    return UnlearnConfig(**{**base, **changes})


def _lowers_its_loss(result) -> bool:
    first_epoch = [r.loss for r in result.losses if r.epoch == 1]
    last_epoch = [r.loss for r in result.losses if r.epoch == result.epochs_run]
    return sum(last_epoch) / len(last_epoch) < sum(first_epoch) / len(first_epoch)


def test_strategy_grammar():
    assert parse_strategy("lora+qat:nf4").model_dump(exclude={"name"}) == {
        "adapter": "lora", "sure": False, "quail_spec": None, "qat": "nf4"}
    assert parse_strategy("quail:rtn:w4g64").quail_spec == "rtn:w4g64" and parse_strategy("quail").quail_spec == "nf4"
    assert parse_strategy("sure").sure and parse_strategy("full").adapter == "full"
    assert parse_strategy("lora+qat:rtn:w4g64").slug == "lora_qat_rtn_w4g64"
    for bad, message in (("lora+sure", "does not combine"), ("qat", "needs the deployment spec"),
                         ("full+lora", "not both"), ("dora", "not one of")):
        with pytest.raises(UserError, match=message):
            parse_strategy(bad)
    settings = strategy_settings(parse_strategy("sure"), "tiny", "ga", base_lr=3e-4)
    assert settings["sure_percentile"] == 95.0 and settings["lr"] == pytest.approx(9e-4)  # 3x: the tiny sweep
    assert strategy_settings(parse_strategy("sure"), "paper", "ga", base_lr=1e-5)["lr"] == pytest.approx(1e-4)


def test_sure_moves_only_salient_rows(tiny_model_dir, tiny_corpus, tmp_path):
    """One optimizer step over the whole forget set at the 95th percentile: at most ~5% of all rows move."""
    config = _cfg(epochs=1, batch_size=64, sure_percentile=95.0)
    result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / "sure", progress=False)
    assert len(result.losses) == 1
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.model_dir / "model.safetensors")
    rows = changed = 0
    for name, weight in before.items():
        moved = (after[name] != weight).reshape(weight.shape[0], -1).any(dim=1)
        rows += moved.numel()
        changed += int(moved.sum())
    assert 0 < changed <= 0.05 * rows + 1, (changed, rows)
    plain = unlearn(tiny_model_dir, tiny_corpus, _cfg(epochs=1, batch_size=64), tmp_path / "plain", progress=False)
    plain_after = load_file(plain.model_dir / "model.safetensors")
    plain_changed = sum(int((plain_after[n] != w).reshape(w.shape[0], -1).any(dim=1).sum()) for n, w in before.items())
    assert plain_changed > 10 * changed  # full fine-tuning moves (nearly) every row


def test_sure_lowers_its_loss(tiny_model_dir, tiny_corpus, tmp_path):
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(sure_percentile=90.0, lr=1e-2), tmp_path / "s", progress=False)
    assert _lowers_its_loss(result)


def test_quail_hinge_starts_at_its_margin_and_is_pushed_down(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "quail"
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(quail_weight=1.0, quail_spec="rtn:w4g64"), out, progress=False)
    margin = json.loads((out / "unlearn.json").read_text())["progress"]["quail_margin"]
    assert margin > 0
    # at step 0 the policy is the reference: every forget position is at distance 0, so the hinge is the margin
    assert result.losses[0].quail == pytest.approx(margin, rel=1e-5)
    assert result.losses[-1].quail < 0.5 * margin
    assert _lowers_its_loss(result)
    weight_margin = unlearn(tiny_model_dir, tiny_corpus, _cfg(epochs=1, quail_weight=1.0, quail_margin="weight",
                                                              quail_spec="rtn:w4g64"), tmp_path / "w", progress=False)
    assert weight_margin.losses[0].quail < margin / 10  # the literal weight-step margin is far smaller (logit units)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_quantization_aware_reference_is_the_deployed_original(adapter, tiny_model_dir, tiny_corpus, tmp_path):
    """NPO's reference under QAT is Q(W0): log-ratio exactly 0 at step 0; the run trains and lowers its loss."""
    config = _cfg(method="npo", reg="klr", adapter=adapter, qat="rtn:w4g64", lr=1e-2 if adapter == "lora" else 1e-3)
    result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / adapter, progress=False)
    assert result.losses[0].log_ratio == 0.0
    assert result.losses[0].retain == 0.0  # KL(Q(W0) || Q(W0)) before any update
    assert _lowers_its_loss(result)


def test_quantization_aware_lora_update_survives_rounding(tiny_model_dir, tiny_corpus, tmp_path):
    """Trained against Q(W0 + s B A), the merged LoRA update changes the deployed rtn:w4g64 codes of the layers."""
    spec = parse_spec("rtn:w4g64")
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(adapter="lora", lr=1e-2, qat="rtn:w4g64", qat_mix=0.5),
                     tmp_path / "lora", progress=False)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.model_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    changed = (quantize_weight(after[name], spec).codes != quantize_weight(before[name], spec).codes).float().mean()
    assert changed > 0.01


def test_bad_strategy_settings_are_one_line_errors(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    args = ["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "o"),
            "--defaults", "tiny", "--no-progress"]
    for extra, expected in ((["--qat", "int8"], "supports rtn"), (["--qat", "gptq:w4g128"], "supports rtn"),
                            (["--sure-percentile", "150"], "--sure-percentile"),
                            (["--sure-percentile", "0"], "--sure-percentile"),
                            (["--adapter", "lora", "--sure-percentile", "95"], "SURE"),
                            (["--quail-weight", "1", "--loss-chunk", "8"], "QUAIL")):
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o" / "model").exists()
