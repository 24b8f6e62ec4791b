"""The strategies against quantization undoing unlearning (SURE, QUAIL, quantization-aware), run through the recipe:
each lowers its loss, each does what defines it, and bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qrunlearn.cli import main
from qrunlearn.config import ExperimentConfig
from qrunlearn.errors import UserError
from qrunlearn.quant import parse_spec, quantize_weight
from qrunlearn.quant.fake import fake_quantized
from qrunlearn.unlearn import UnlearnConfig, reference, storage, strategy_hooks, unlearn
from qrunlearn.unlearn.strategy import Strategy


def _cfg(**changes) -> UnlearnConfig:
    base = dict(method="ga", reg="gdr", lr=1e-3, epochs=2, batch_size=8, grad_accum=1,
                max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0, seed=0)
    return UnlearnConfig(**{**base, **changes})


def _lowers_its_loss(result) -> bool:
    first_epoch = [r.loss for r in result.losses if r.epoch == 1]
    last_epoch = [r.loss for r in result.losses if r.epoch == result.epochs_run]
    return sum(last_epoch) / len(last_epoch) < sum(first_epoch) / len(first_epoch)


def test_strategy_grammar():
    lora_qat = Strategy.parse("lora+qat:nf4:mix=0.5")
    assert lora_qat.adapter == "lora" and lora_qat.qat is not None and lora_qat.qat.spec == parse_spec("nf4")
    assert lora_qat.qat.mix == 0.5 and lora_qat.sure is None and lora_qat.quail is None
    quail = Strategy.parse("quail:rtn:w4g64:weight=2:margin=weight")
    assert quail.quail is not None and quail.quail.spec == parse_spec("rtn:w4g64")
    assert (quail.quail.weight, quail.quail.margin) == (2.0, "weight")
    assert Strategy.parse("quail").quail.spec == parse_spec("nf4")  # type: ignore[union-attr]
    sure = Strategy.parse("sure:percentile=90")
    assert sure.adapter == "full" and sure.sure is not None and sure.sure.percentile == 90.0
    assert Strategy.parse("lora+qat:rtn:w4g64").slug == "lora_qat_rtn_w4g64"
    # the label is the canonical text and reads back as the same strategy; defaults are not written
    for text, label in (("full", "full"), ("lora", "lora"), ("full+sure", "sure"), ("quail:nf4", "quail"),
                        ("lora+qat:NF4:mix=1", "lora+qat:nf4"), ("sure:percentile=90", "sure:percentile=90"),
                        ("qat:rtn:w4g64+quail", "quail+qat:rtn:w4g64")):
        assert Strategy.parse(text).label == label and Strategy.parse(label) == Strategy.parse(text), text
    for bad, message in (("lora+sure", "does not combine"), ("qat", "needs the deployment spec"),
                         ("full+lora", "not both"), ("dora", "not one of"), ("qat:int8", "supports rtn"),
                         ("sure:percentile=150", "sure.percentile"), ("qat:nf4:mixx=1", "qat.mixx"),
                         ("quail:int9", "unknown quantization spec"), ("quail:int8", "the logit margin")):
        with pytest.raises(UserError, match=message):
            Strategy.parse(bad)


def test_sure_learning_rate_is_the_strategys_rule():
    """SURE's lr factor belongs to the strategy: the default set fixes it when left open, and an lr override
    (a grid's `hparams: full: {lr}`, the CLI's --lr) sets the base it multiplies instead of cancelling it."""
    tiny = UnlearnConfig.defaults("tiny", "ga", "gdr", "sure")
    assert tiny.effective_lr == pytest.approx(3 * tiny.lr) and tiny.lr == pytest.approx(3e-4)  # 3x: the tiny sweep
    paper = UnlearnConfig.defaults("paper", "ga", "gdr", "sure")
    assert paper.effective_lr == pytest.approx(1e-4)
    assert UnlearnConfig.defaults("paper", "ga", "gdr", "sure:lr_factor=2").effective_lr == pytest.approx(2e-5)
    assert UnlearnConfig.defaults("paper", "ga", "gdr", "full").effective_lr == pytest.approx(1e-5)
    grid = ExperimentConfig.model_validate({"defaults": "paper", "strategies": ["full", "sure"],
                                            "hparams": {"full": {"lr": 3e-5}}})
    assert grid.unlearn_config("ga_gdr", "sure").effective_lr == pytest.approx(3e-4)
    assert grid.unlearn_config("ga_gdr", "full").effective_lr == pytest.approx(3e-5)


def test_records_written_before_typed_strategies_still_read():
    """A cell's unlearn_config from before (flat fields, lr already multiplied) reads as the same run."""
    old = {"method": "ga", "reg": "gdr", "adapter": "full", "lr": 9e-4, "sure_percentile": 95.0, "quail_weight": 0.0,
           "quail_spec": "nf4", "quail_margin": "logit", "qat": None, "qat_mix": 1.0}
    config = UnlearnConfig.model_validate(old)
    assert config.strategy.sure is not None and config.effective_lr == pytest.approx(9e-4)
    lora_qat = UnlearnConfig.model_validate({"adapter": "lora", "qat": "rtn:w4g64", "qat_mix": 0.5, "quail_weight": 0})
    assert lora_qat.strategy == Strategy.parse("lora+qat:rtn:w4g64:mix=0.5")
    assert UnlearnConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValueError, match="contradicts"):
        UnlearnConfig(adapter="lora", strategy=Strategy.parse("sure"))


def test_sure_moves_only_salient_rows(tiny_model_dir, tiny_corpus, tmp_path):
    """One optimizer step over the whole forget set at the 95th percentile: at most ~5% of all rows move."""
    config = _cfg(epochs=1, batch_size=64, strategy="sure:lr_factor=1")
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
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(strategy="sure:percentile=90:lr_factor=10", lr=1e-3),
                     tmp_path / "s", progress=False)
    assert _lowers_its_loss(result)


def test_quail_hinge_starts_at_its_margin_and_is_pushed_down(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "quail"
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(strategy="quail:rtn:w4g64"), out, progress=False)
    margin = json.loads((out / "unlearn.json").read_text())["progress"]["quail_margin"]
    assert margin > 0
    # at step 0 the policy is the reference: every forget position is at distance 0, so the hinge is the margin
    assert result.losses[0].quail == pytest.approx(margin, rel=1e-5)
    assert result.losses[-1].quail < 0.5 * margin
    assert _lowers_its_loss(result)
    weight_margin = unlearn(tiny_model_dir, tiny_corpus, _cfg(epochs=1, strategy="quail:rtn:w4g64:margin=weight"),
                            tmp_path / "w", progress=False)
    assert weight_margin.losses[0].quail < margin / 10  # the literal weight-step margin is far smaller (logit units)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_quantization_aware_reference_is_the_deployed_original(adapter, tiny_model_dir, tiny_corpus, tmp_path):
    """NPO's reference under QAT is Q(W0): log-ratio exactly 0 at step 0; the run trains and lowers its loss."""
    config = _cfg(method="npo", reg="klr", strategy=f"{adapter}+qat:rtn:w4g64", lr=1e-2 if adapter == "lora" else 1e-3)
    result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / adapter, progress=False)
    assert result.losses[0].log_ratio == 0.0
    assert result.losses[0].retain == 0.0  # KL(Q(W0) || Q(W0)) before any update
    assert _lowers_its_loss(result)


def test_fake_quantization_is_installed_once_per_run_and_the_epoch_hook_sees_the_saved_model(
        tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """QAT's forward is installed once for the run (policy and frozen reference), not per pass; the epoch hook
    measures the full-precision model, the one written for that epoch."""
    installs: list[str] = []
    real_policy, real_reference = strategy_hooks.fake_quantized, reference.fake_quantized

    def counted(real, who):
        def install(model, spec):
            installs.append(who)
            return real(model, spec)
        return install

    monkeypatch.setattr(strategy_hooks, "fake_quantized", counted(real_policy, "policy"))
    monkeypatch.setattr(reference, "fake_quantized", counted(real_reference, "reference"))
    probe = torch.tensor([[5, 9, 13, 20, 31]])
    hooked: list[torch.Tensor] = []

    def hook(epoch, model, tokenizer):
        hooked.append(model(input_ids=probe).logits)
        return {}

    config = _cfg(method="npo", reg="klr", strategy="qat:rtn:w4g64:mix=0.5", save_every_epoch=True)
    result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / "qat", epoch_hook=hook, progress=False)
    assert len(result.losses) >= 4 and installs == ["policy", "reference"]
    saved = AutoModelForCausalLM.from_pretrained(storage.epoch_model_dir(tmp_path / "qat", 1)).eval()
    with torch.no_grad():
        assert torch.equal(saved(input_ids=probe).logits, hooked[0])
        with fake_quantized(saved, "rtn:w4g64"):
            assert not torch.allclose(saved(input_ids=probe).logits, hooked[0])


def test_quantization_aware_lora_update_survives_rounding(tiny_model_dir, tiny_corpus, tmp_path):
    """Trained against Q(W0 + s B A), the merged LoRA update changes the deployed rtn:w4g64 codes of the layers."""
    spec = parse_spec("rtn:w4g64")
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(strategy="lora+qat:rtn:w4g64:mix=0.5", lr=1e-2),
                     tmp_path / "lora", progress=False)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.model_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    changed = (quantize_weight(after[name], spec).codes != quantize_weight(before[name], spec).codes).float().mean()
    assert changed > 0.01


def test_bad_strategy_settings_are_one_line_errors(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    args = ["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "o"),
            "--defaults", "tiny", "--no-progress"]
    for extra, expected in ((["--strategy", "qat:int8"], "--strategy: strategy 'qat:int8': qat.spec: "
                                                         "quantization-aware unlearning supports rtn"),
                            (["--strategy", "qat:gptq:w4g128"], "supports rtn"),
                            (["--strategy", "sure:percentile=150"], "sure.percentile"),
                            (["--strategy", "sure:percentile=0"], "sure.percentile"),
                            (["--strategy", "lora+sure"], "SURE"), (["--strategy", "dora"], "not one of"),
                            (["--strategy", "quail", "--loss-chunk", "8"], "QUAIL")):
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o" / "model").exists()


def test_cli_strategy_and_the_grids_strategy_train_the_same_model(tiny_model_dir, tiny_corpus, tiny_corpus_dir,
                                                                  tmp_path):
    """`qrunlearn unlearn --strategy sure` and the grid's `sure` cell are one configuration, so one model to the
    bit (before typed strategies the CLI's SURE trained at the base lr)."""
    cli_out = tmp_path / "cli"
    assert main(["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out", str(cli_out),
                 "--defaults", "tiny", "--strategy", "sure", "--epochs", "1", "--no-progress"]) == 0
    grid = ExperimentConfig.model_validate({"defaults": "tiny", "methods": ["ga_gdr"], "strategies": ["sure"],
                                            "hparams": {"sure": {"epochs": 1}}})
    config = grid.unlearn_config("ga_gdr", "sure")
    recorded = UnlearnConfig.model_validate(json.loads((cli_out / "unlearn.json").read_text())["config"])
    assert recorded == config and config.effective_lr == pytest.approx(3 * config.lr)
    grid_run = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / "grid", progress=False)
    cli_weights = load_file(cli_out / "model" / "model.safetensors")
    grid_weights = load_file(grid_run.model_dir / "model.safetensors")
    assert cli_weights.keys() == grid_weights.keys()
    assert all(bool((cli_weights[name] == grid_weights[name]).all()) for name in cli_weights)
    before = load_file(tiny_model_dir / "model.safetensors")
    assert any(bool((before[name] != grid_weights[name]).any()) for name in before)  # it trained
