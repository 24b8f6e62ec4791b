"""Blocked causal attention: equal to softmax attention computed in float64, taken only where it applies, and a
Llama's logits through it equal SDPA's."""

from __future__ import annotations

import pytest
import torch

from qrunlearn.models.kernels import attention
from qrunlearn.models.kernels.attention import BLOCK, MIN_POSITIONS, blocked_attention, blocked_causal_attention
from qrunlearn.models.kernels.onednn import ONEDNN_LINEAR

pytestmark = pytest.mark.skipif(ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN linear")


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention in float64, key-value heads repeated as transformers' `repeat_kv` does;
    returned as (B, T, H, D)."""
    group = query.shape[1] // key.shape[1]
    q, k, v = (t.double() for t in (query, key, value))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    positions = q.shape[2]
    scores = scores.masked_fill(torch.ones(positions, positions, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("positions", [MIN_POSITIONS, 3 * BLOCK + 5, 1])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
def test_equals_causal_softmax_attention(positions, heads, kv_heads):
    torch.manual_seed(0)
    query = torch.randn(2, heads, positions, 16)
    key, value = torch.randn(2, kv_heads, positions, 16), torch.randn(2, kv_heads, positions, 16)
    got = blocked_causal_attention(query, key, value, scaling=0.25)
    expected = _reference(query, key, value, 0.25)
    assert got.shape == (2, positions, heads, 16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def blocked_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Query shapes of the attention calls that took the blocked path."""
    calls: list[tuple[int, ...]] = []
    real = attention.blocked_causal_attention

    def spy(query, key, value, scaling):
        calls.append(tuple(query.shape))
        return real(query, key, value, scaling)

    monkeypatch.setattr(attention, "blocked_causal_attention", spy)
    return calls


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_a_llama_forward_agrees_with_sdpa_and_only_long_unmasked_passes_are_blocked(blocked_calls):
    model = _llama()
    ids = torch.randint(0, 300, (2, MIN_POSITIONS + 40))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with blocked_attention(model) as switched:
            got = model(input_ids=ids).logits
            assert blocked_calls == [(2, 4, MIN_POSITIONS + 40, 16)] * 2  # both layers
            model(input_ids=ids[:, :MIN_POSITIONS - 1])  # too short
            padded = torch.ones_like(ids)
            padded[0, -5:] = 0
            model(input_ids=ids, attention_mask=padded)  # a padding mask: SDPA's masked path
        assert len(blocked_calls) == 2
    assert switched and model.config._attn_implementation == "sdpa"  # restored on exit
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_training_and_disabled_and_eager_models_keep_their_attention(blocked_calls):
    model = _llama()
    ids = torch.randint(0, 300, (1, MIN_POSITIONS))
    with blocked_attention(model):
        model(input_ids=ids).logits.sum().backward()  # autograd: SDPA, whose backward exists
    with torch.inference_mode(), blocked_attention(model, enabled=False) as switched:
        model(input_ids=ids)
    assert not switched
    model.config._attn_implementation = "eager"
    with torch.inference_mode(), blocked_attention(model) as switched:
        model(input_ids=ids)
    assert not switched and model.config._attn_implementation == "eager"
    assert blocked_calls == []
