"""Precision end to end, the reference at the policy's precision, and impossible combinations."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from qrunlearn.errors import UserError
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.train import collate
from qrunlearn.unlearn import UnlearnConfig, objectives, parallel, recipe, unlearn
from qrunlearn.unlearn.data import load_unlearn_data
from qrunlearn.unlearn.reference import NLL_FILE


class _Crash(Exception):
    pass


def _cfg(**changes) -> UnlearnConfig:
    base = dict(method="npo", reg="gdr", adapter="full", lr=1e-3, epochs=1, batch_size=4, grad_accum=2,
                max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0, seed=0)
    return UnlearnConfig(**{**base, **changes})


# bf16 training is refused on a CPU without bf16 instructions (the error is tested below); some CI machines lack them
_NEEDS_BF16 = pytest.mark.skipif(not parallel._cpu_has_bf16(), reason="this CPU has no bf16 instructions "
                                 "(AVX512-BF16 / AMX): bf16 training is refused here")


@pytest.mark.parametrize("dtype,precision", [("float32", "mixed"), pytest.param("bfloat16", "mixed", marks=_NEEDS_BF16),
                                             pytest.param("bfloat16", "pure", marks=_NEEDS_BF16)])
def test_npo_log_ratio_is_exactly_zero_at_step_zero(dtype, precision, tiny_model_dir, tiny_corpus, tmp_path):
    """The reference NLLs come from the policy's own forward at its own precision, so before the first update the
    log-ratio log pi_theta / pi_ref is 0 exactly (a fp32 reference under a bf16 policy would give ~1e-1)."""
    result = unlearn(tiny_model_dir, tiny_corpus, _cfg(dtype=dtype, precision=precision), tmp_path / "run",
                     progress=False)
    assert result.losses[0].log_ratio == 0.0
    assert result.losses[0].forget == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert result.losses[-1].log_ratio != 0.0  # the policy did move away from the reference


def test_reference_nll_cache_equals_online_computation_and_is_reused(tiny_model_dir, tiny_corpus, tmp_path,
                                                                     monkeypatch):
    config = _cfg(epochs=2)
    out = tmp_path / "run"
    result = unlearn(tiny_model_dir, tiny_corpus, config, out, progress=False)
    with safe_open(str(out / NLL_FILE), framework="pt") as handle:
        cached = handle.get_tensor("nll")
        assert handle.metadata()["fingerprint"]
    model, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    data = load_unlearn_data(tiny_corpus, tokenizer, "forget", "retain1", needs_retain=True, max_length=128)
    online = []
    with torch.no_grad():
        for chunk in data.forget:  # one chunk at a time: a different batching from the run's
            batch = collate([chunk], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            online.append(objectives.sequence_nll(logits, batch["labels"])[0])
    assert torch.allclose(cached, torch.cat(online), rtol=1e-6, atol=1e-5)
    assert len(cached) == len(data.forget) and result.epochs_run == 2

    # a rerun of the same run from its epoch-1 checkpoint reads the cached values instead of recomputing them
    def must_not_run(self):
        raise AssertionError("reference NLLs recomputed")

    crashed = tmp_path / "crashed"

    def crash_after_epoch_1(epoch, model, tokenizer):
        if epoch == 2:
            raise _Crash
        return None

    with pytest.raises(_Crash):
        unlearn(tiny_model_dir, tiny_corpus, config, crashed, epoch_hook=crash_after_epoch_1, progress=False)
    monkeypatch.setattr(recipe.UnlearnRecipe, "_reference_nll", must_not_run)
    resumed = unlearn(tiny_model_dir, tiny_corpus, config, crashed, progress=False)
    assert [r.forget for r in resumed.losses] == pytest.approx([r.forget for r in result.losses], rel=1e-5)


def test_chunked_losses_train_like_unchunked(tiny_model_dir, tiny_corpus, tmp_path):
    """A run whose losses are formed 7 positions at a time follows the full-logits run (float noise only)."""
    for reg in ("gdr", "klr"):
        plain = unlearn(tiny_model_dir, tiny_corpus, _cfg(reg=reg), tmp_path / f"plain-{reg}", progress=False)
        chunked = unlearn(tiny_model_dir, tiny_corpus, _cfg(reg=reg, loss_chunk=7), tmp_path / f"chunk-{reg}",
                          progress=False)
        assert [r.forget for r in chunked.losses] == pytest.approx([r.forget for r in plain.losses], rel=1e-4)
        assert [r.retain for r in chunked.losses] == pytest.approx([r.retain for r in plain.losses], rel=1e-3,
                                                                   abs=1e-6)


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, tiny_corpus, tmp_path):
    for adapter in ("full", "lora"):
        plain = unlearn(tiny_model_dir, tiny_corpus, _cfg(adapter=adapter, reg="klr"), tmp_path / f"p{adapter}",
                        progress=False)
        checkpointed = unlearn(tiny_model_dir, tiny_corpus, _cfg(adapter=adapter, reg="klr",
                                                                 gradient_checkpointing=True),
                               tmp_path / f"c{adapter}", progress=False)
        assert [r.loss for r in checkpointed.losses] == pytest.approx([r.loss for r in plain.losses], rel=1e-5)


def test_impossible_combinations_are_one_line_errors(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--sharding fsdp needs several processes"):
        unlearn(tiny_model_dir, tiny_corpus, _cfg(sharding="fsdp"), tmp_path / "a", progress=False)
    monkeypatch.setattr(parallel, "_cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="this CPU has no bf16 instructions"):
        unlearn(tiny_model_dir, tiny_corpus, _cfg(dtype="bfloat16"), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
