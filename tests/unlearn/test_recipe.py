"""End-to-end runs on the tiny fixtures (random-init hidden-64 Llama, 18 forget documents): a few steps each."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.models.train import collate
from qrunlearn.unlearn import UnlearnConfig, recipe, unlearn
from qrunlearn.unlearn.data import load_unlearn_data
from qrunlearn.unlearn.objectives import nll_loss
from qrunlearn.unlearn.strategy_hooks import StrategyHooks


def _cfg(**changes) -> UnlearnConfig:
    base = dict(method="ga", reg="gdr", adapter="full", lr=1e-3, epochs=2, batch_size=8, grad_accum=1,
                max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0, seed=0)
    return UnlearnConfig(**{**base, **changes})


def _forget_nll(model_dir, corpus) -> float:
    from qrunlearn.models.loading import load_causal_lm

    model, tok = load_causal_lm(model_dir, dtype="float32", device="cpu")
    data = load_unlearn_data(corpus, tok, "forget", "retain1", needs_retain=False, max_length=128)
    batch = collate(data.forget, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nll_loss(logits, batch["labels"]).item()


def test_full_ga_gdr_writes_a_finished_standard_folder_and_raises_forget_nll(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(), out, progress=False)
    assert result.model_dir == out / "model" and result.adapter_dir is None
    assert result.epochs_run == 2 and result.stopped_reason == "completed"
    assert {"config.json", "model.safetensors", "tokenizer.json", "unlearn.json"} <= {
        p.name for p in result.model_dir.iterdir()}
    assert not (out / "checkpoint").exists()
    record = json.loads((out / "unlearn.json").read_text())
    assert record["status"] == "finished" and record["config"]["method"] == "ga"
    assert record["provenance"]["versions"]["torch"] and len(record["progress"]["losses"]) == len(result.losses) > 0
    assert all(math.isfinite(r.forget) and math.isfinite(r.retain) for r in result.losses)
    assert _forget_nll(result.model_dir, tiny_corpus) > _forget_nll(tiny_model_dir, tiny_corpus) + 0.05

    again = unlearn(tiny_model_dir, tiny_corpus, _cfg(), out, progress=False)  # finished: reused, not retrained
    assert again.reused and not result.reused and again.losses == result.losses
    with pytest.raises(UserError, match="holds a different run"):
        unlearn(tiny_model_dir, tiny_corpus, _cfg(lr=2e-3), out, progress=False)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_npo_klr_starts_at_the_reference(adapter, tiny_model_dir, tiny_corpus, tmp_path):
    """First step: theta = ref, so NPO = (2/beta) ln 2 and KL(p_ref || p_theta) = 0 -- for LoRA that checks the
    reference is the model with adapters disabled, for full FT the frozen copy."""
    config = _cfg(method="npo", reg="klr", adapter=adapter, epochs=1, beta=0.1)
    result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / adapter, progress=False)
    first = result.losses[0]
    assert first.forget == pytest.approx(20 * math.log(2), rel=1e-4)
    assert first.retain == pytest.approx(0.0, abs=1e-6)
    assert result.losses[-1].retain > 0  # the model moved away from the reference
    if adapter == "lora":
        _check_merged_equals_adapter(tiny_model_dir, result)


@pytest.mark.parametrize("method,reg,adapter", [("ga", "gdr", "full"), ("npo", "klr", "full"), ("npo", "klr", "lora")])
def test_passes_grouped_by_length_give_the_one_pass_result(method, reg, adapter, tiny_model_dir, tiny_corpus,
                                                          tmp_path, monkeypatch):
    """The loss is a sum normalised by the global batch's counts, so forward passes over length groups (some holding
    only retain rows) add up to the padded one-pass gradient: same losses, same weights up to float order."""
    passes: list[int] = []
    first_gradients: list[torch.Tensor] = []
    statistics, update = recipe.UnlearnRecipe._statistics, StrategyHooks.optimizer_step

    def counted(self, micro):
        passes.append(len(micro.forget) + len(micro.retain))
        return statistics(self, micro)

    def recorded(self, optimizer):
        if not first_gradients:  # the first step: both runs are at the same weights
            params = [p for group in optimizer.param_groups for p in group["params"]]
            first_gradients.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
        return update(self, optimizer)

    monkeypatch.setattr(recipe.UnlearnRecipe, "_statistics", counted)
    monkeypatch.setattr(StrategyHooks, "optimizer_step", recorded)
    runs = {}
    for name, cost in [("one", 10**6), ("grouped", 0)]:
        passes.clear()
        first_gradients.clear()
        config = _cfg(method=method, reg=reg, adapter=adapter, epochs=1, lr=1e-3, lora_dropout=0.0,
                      pass_cost_tokens=cost)
        result = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / name, progress=False)
        runs[name] = (result, list(passes), first_gradients[0])
    (one, one_passes, one_gradient), (grouped, grouped_passes, grouped_gradient) = runs["one"], runs["grouped"]
    assert len(grouped_passes) > 2 * len(one_passes) and sum(grouped_passes) == sum(one_passes)
    assert (one_gradient - grouped_gradient).norm() < 1e-5 * one_gradient.norm()
    assert len(one.losses) == len(grouped.losses) > 1
    for a, b in zip(one.losses, grouped.losses):
        assert a.forget == pytest.approx(b.forget, rel=1e-5) and a.retain == pytest.approx(b.retain, rel=1e-4, abs=1e-7)
    w0 = load_file(tiny_model_dir / "model.safetensors")
    w1, w2 = (load_file(r.model_dir / "model.safetensors") for r in (one, grouped))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    # Adam divides by sqrt(v): float noise in near-zero gradient entries grows to a visible share of a step
    assert moved > 1e-4 and diff < 1e-2 * moved, (diff, moved)


def _check_merged_equals_adapter(base_dir, result):
    from peft import PeftModel

    from qrunlearn.models.loading import load_causal_lm

    merged, tok = load_causal_lm(result.model_dir, dtype="float32", device="cpu")
    base, _ = load_causal_lm(base_dir, dtype="float32", device="cpu")
    peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    ids = torch.tensor([tok("A historian at the city council").input_ids])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            c = peft_model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the merged update is not nothing
    targets = json.loads((result.adapter_dir / "unlearn.json").read_text())["lora_targets"]
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_from_its_last_checkpoint(tiny_model_dir, tiny_corpus, tmp_path):
    config = _cfg(adapter="lora", lr=1e-2, lora_dropout=0.1)  # dropout: resume must restore the RNG too
    straight = unlearn(tiny_model_dir, tiny_corpus, config, tmp_path / "straight", progress=False)

    def crash_in_epoch_2(epoch, model, tokenizer):
        if epoch == 2:
            raise _Crash()
        return {"hook_epoch": epoch}

    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        unlearn(tiny_model_dir, tiny_corpus, config, out, epoch_hook=crash_in_epoch_2, progress=False)
    assert (out / "checkpoint" / "state.json").exists()
    assert not (out / "model").exists() and not (out / "unlearn.json").exists()
    resumed = unlearn(tiny_model_dir, tiny_corpus, config, out, epoch_hook=lambda e, m, t: {"hook_epoch": e},
                      progress=False)
    assert resumed.epochs[0].metrics["hook_epoch"] == 1  # epoch 1's metrics come from the checkpoint
    assert [r.forget for r in resumed.losses] == pytest.approx([r.forget for r in straight.losses], rel=1e-5)
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_non_finite_loss_keeps_the_last_good_epoch(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    poisoned = {"on": False}
    real = recipe.objectives.nll_from_tokens

    def nll_from_tokens(nll, mask, num_tokens=None):
        loss = real(nll, mask, num_tokens)
        return loss * float("nan") if poisoned["on"] else loss

    def hook(epoch, model, tokenizer):
        poisoned["on"] = epoch == 1  # epoch 2 produces NaN
        return None

    monkeypatch.setattr(recipe.objectives, "nll_from_tokens", nll_from_tokens)
    out = tmp_path / "nan"
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(epochs=3, save_every_epoch=True), out, epoch_hook=hook,
                     progress=False)
    assert result.epochs_run == 1
    assert "non-finite loss at epoch 2 step 1" in result.stopped_reason and "epoch 1" in result.stopped_reason
    kept = load_file(result.model_dir / "model.safetensors")
    epoch1 = load_file(out / "epochs" / "epoch_001" / "model.safetensors")
    assert all(torch.equal(kept[k], epoch1[k]) for k in kept)
    assert all(r.epoch == 1 for r in result.losses)

    poisoned["on"] = True  # NaN before any epoch finished: one-line error, nothing written
    with pytest.raises(UserError, match="before any epoch finished"):
        unlearn(tiny_model_dir, tiny_corpus, _cfg(), tmp_path / "nan0", progress=False)
    assert not (tmp_path / "nan0" / "model").exists()


def test_muse_selection_stops_at_the_first_epoch_at_or_below_retrain(tiny_model_dir, tiny_corpus, tmp_path):
    scores = {1: 60.0, 2: 25.0, 3: 10.0}
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(epochs=3, stop_knowmem_f=30.0), tmp_path / "sel",
                     epoch_hook=lambda e, m, t: {"knowmem_f": scores[e]}, progress=False)
    assert result.selected_epoch == 2 and result.epochs_run == 2
    assert result.stopped_reason.startswith("selected: epoch 2")
    assert [e.metrics["knowmem_f"] for e in result.epochs] == [60.0, 25.0]


def test_bad_input_is_a_one_line_user_error(tiny_model_dir, tiny_corpus, tmp_path):
    empty = MuseCorpus(root=tmp_path, raw={"forget": [], "retain1": ["text"]})
    with pytest.raises(UserError, match="empty forget set"):
        unlearn(tiny_model_dir, empty, _cfg(), tmp_path / "e", progress=False)
    no_retain = MuseCorpus(root=tmp_path, raw={"forget": tiny_corpus.raw["forget"]})
    with pytest.raises(UserError, match="retain term needs retain data"):
        unlearn(tiny_model_dir, no_retain, _cfg(reg="klr"), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="needs an epoch hook"):
        unlearn(tiny_model_dir, tiny_corpus, _cfg(stop_knowmem_f=1.0), tmp_path / "h", progress=False)
