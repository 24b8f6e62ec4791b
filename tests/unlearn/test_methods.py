"""The field's other unlearning methods (WGA, SatImp, UNDIAL, IdkDPO, RMU) through the recipe, on a tiny model that
has memorised the forget set: each trains (its forget NLL rises), each proper objective falls, the reference point
is where the formulas put it, RMU trains only what its paper trains, and bad input is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from qrunlearn.cli import main
from qrunlearn.data.muse import load_corpus
from qrunlearn.errors import UserError
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.train import TrainConfig, collate, train_causal_lm
from qrunlearn.unlearn import UnlearnConfig, objectives, unlearn
from qrunlearn.unlearn.data import load_unlearn_data

NEW_METHODS = [("wga", "gdr"), ("satimp", "gdr"), ("undial", "gdr"), ("idkdpo", "gdr"), ("rmu", "act")]


@pytest.fixture(scope="module")
def memorised_model_dir(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """The tiny model after 20 epochs on forget + retain1 (token NLL ~0.8 on the forget chunks)."""
    out = tmp_path_factory.mktemp("memorised")
    model, tokenizer = load_causal_lm(tiny_model_dir)
    train_causal_lm(model, tokenizer, tiny_corpus.raw["forget"] + tiny_corpus.raw["retain1"],
                    TrainConfig(epochs=20, lr=3e-3, max_length=128), progress=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _config(method: str, reg: str, adapter: str, **changes) -> UnlearnConfig:
    settings = dict(method=method, reg=reg, strategy=adapter, lr=3e-3 if adapter == "full" else 1e-2, epochs=3,
                    batch_size=8, grad_accum=1, max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0, seed=0)
    return UnlearnConfig(**{**settings, **changes})


@torch.no_grad()
def forget_nll(folder: Path, corpus, answers_only: bool) -> float:
    """Token-mean NLL of the forget chunks (IdkDPO: of the forget questions' answers)."""
    model, tokenizer = load_causal_lm(folder)
    data = load_unlearn_data(corpus, tokenizer, "forget", "retain1", False, 128, forget_from_qa=answers_only)
    batch = collate(data.forget, tokenizer.pad_token_id)
    if data.forget_scored_from is not None:
        for row, start in enumerate(data.forget_scored_from):
            batch["labels"][row, :start] = objectives.IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return objectives.nll_loss(logits, batch["labels"]).item()


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("method", [m for m, _ in NEW_METHODS])
def test_each_method_trains_and_raises_the_forget_nll(method, adapter, memorised_model_dir, tiny_corpus, tmp_path):
    """The forget term alone (no retain term: training on retain text also raises the forget NLL of a model that
    memorised both, which would hide a forget term that trains nothing)."""
    result = unlearn(memorised_model_dir, tiny_corpus, _config(method, "none", adapter), tmp_path / "run",
                     progress=False)
    answers_only = method == "idkdpo"
    before = forget_nll(memorised_model_dir, tiny_corpus, answers_only)
    after = forget_nll(result.model_dir, tiny_corpus, answers_only)
    assert after > before + 0.02, f"forget NLL {before:.4f} -> {after:.4f}"
    if method in ("undial", "idkdpo", "rmu"):  # proper objectives (WGA / SatImp re-weight every step)
        first, last = result.losses[0].forget, result.losses[-1].forget
        assert last < first, f"{method}'s own loss {first:.4f} -> {last:.4f}"


def test_idkdpo_and_rmu_start_at_their_reference_points(memorised_model_dir, tiny_corpus, tmp_path):
    dpo = unlearn(memorised_model_dir, tiny_corpus, _config("idkdpo", "gdr", "full", beta=0.1, epochs=1),
                  tmp_path / "dpo", progress=False)
    assert dpo.losses[0].forget == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert dpo.losses[0].log_ratio == 0.0
    rmu = unlearn(memorised_model_dir, tiny_corpus, _config("rmu", "act", "lora", epochs=1), tmp_path / "rmu",
                  progress=False)
    assert rmu.losses[0].retain == 0.0  # the adapters start at zero: the block's states are the reference's


def test_rmu_full_trains_only_the_papers_weights(memorised_model_dir, tiny_corpus, tmp_path):
    """The tiny model has 2 blocks: layer round(2 * 7/32) = 0, so only block 0's MLP down-projection moves."""
    result = unlearn(memorised_model_dir, tiny_corpus, _config("rmu", "act", "full", epochs=1), tmp_path / "rmu",
                     progress=False)
    before = load_file(str(memorised_model_dir / "model.safetensors"))
    after = load_file(str(result.model_dir / "model.safetensors"))
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    everything = unlearn(memorised_model_dir, tiny_corpus, _config("rmu", "gdr", "full", epochs=1, rmu_params="all",
                                                                   rmu_layer=1), tmp_path / "all", progress=False)
    moved = load_file(str(everything.model_dir / "model.safetensors"))
    assert sum(not torch.equal(before[n], moved[n]) for n in before) > 10


def test_bad_method_input_is_one_line(memorised_model_dir, tiny_corpus_dir, tiny_corpus, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--rmu-layer 5: the model has 2 transformer blocks \(0-1\)"):
        unlearn(memorised_model_dir, tiny_corpus, _config("rmu", "act", "full", rmu_layer=5), tmp_path / "r",
                progress=False)
    with pytest.raises(ValidationError, match="reg 'act' is RMU's retain term"):
        _config("npo", "act", "full")
    with pytest.raises(ValidationError, match="undial distils whole next-token distributions"):
        _config("undial", "gdr", "full", loss_chunk=64)
    no_qa = tmp_path / "no_qa"
    shutil.copytree(tiny_corpus_dir, no_qa)
    shutil.rmtree(no_qa / "knowmem")
    code = main(["unlearn", "--model", str(memorised_model_dir), "--data", str(no_qa), "--out", str(tmp_path / "o"),
                 "--method", "idkdpo", "--defaults", "tiny", "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "forget_qa.json: missing or empty" in err
    assert not (tmp_path / "o" / "model").exists()
    code = main(["unlearn", "--model", str(memorised_model_dir), "--data", str(tiny_corpus_dir), "--out",
                 str(tmp_path / "o"), "--method", "rmu", "--rmu-layer", "9", "--defaults", "tiny", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--rmu-layer 9" in err
    assert load_corpus(no_qa).knowmem == {}


STRATEGY_CASES = [("wga", "klr", "sure"), ("satimp", "gdr", "quail:rtn:w4g64"), ("undial", "gdr", "qat:nf4"),
                  ("idkdpo", "klr", "lora+qat:rtn:w4g64"), ("rmu", "act", "sure"), ("rmu", "gdr", "lora+qat:nf4")]


@pytest.mark.parametrize("method,reg,strategy", STRATEGY_CASES, ids=[f"{m}_{r}-{s}" for m, r, s in STRATEGY_CASES])
def test_each_method_runs_under_the_strategies(method, reg, strategy, memorised_model_dir, tiny_corpus, tmp_path):
    config = _config(method, reg, "lora" if strategy.startswith("lora") else "full", epochs=1, strategy=strategy)
    result = unlearn(memorised_model_dir, tiny_corpus, config, tmp_path / "run", progress=False)
    assert result.losses and all(torch.isfinite(torch.tensor([s.loss, s.forget, s.retain])).all()
                                 for s in result.losses)
    assert result.losses[-1].forget != result.losses[0].forget  # it trained
