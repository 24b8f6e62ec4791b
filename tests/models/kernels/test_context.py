"""`kernels(...)`: the one switch installs what applies to the pass and takes everything out afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qrunlearn.models.kernels import KernelsUsed, kernels
from qrunlearn.models.kernels.onednn import ONEDNN_LINEAR

pytestmark = pytest.mark.skipif(ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear")


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_one_switch_per_kind_of_pass():
    model = _llama()
    with kernels(model, enabled=True, inference=True) as used:
        assert used == KernelsUsed(onednn_linear=True, fused_mlps=2, blocked_attention=True)
        assert model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa" and "forward" not in model.model.layers[0].mlp.__dict__
    with kernels(model, enabled=True, inference=False) as used:  # training: the linears only
        assert used == KernelsUsed(onednn_linear=True, fused_mlps=0, blocked_attention=False)
    with kernels(model, enabled=True, inference=False, checkpointing=True) as used:
        assert not used.onednn_linear  # recomputed forwards run outside the routing
    with kernels(model, enabled=False, inference=True) as used:
        assert used == KernelsUsed(onednn_linear=False, fused_mlps=0, blocked_attention=False)


def test_the_same_logits_with_and_without():
    model = _llama()
    ids = torch.randint(0, 64, (2, 300))  # long enough for the blocked attention
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with kernels(model, enabled=True, inference=True):
            fast = model(input_ids=ids).logits
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_importing_the_kernels_changes_nothing_in_transformers():
    """The blocked attention enters transformers' tables when a model first uses it, not at import."""
    probe = ("import qrunlearn.models.kernels.context\n"
             "from transformers import AttentionInterface\n"
             "print('qrunlearn_blocked_sdpa' in AttentionInterface._global_mapping)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
