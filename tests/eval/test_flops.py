"""The FLOP count behind the evaluation benchmark's utilisation: checked against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qrunlearn.eval.flops import (
    ModelShape,
    causal_pairs,
    forward_flops,
    generation_flops,
    prefill_flops,
    scoring_flops,
)


def _llama(tied: bool, kv_heads: int, head_dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                         tie_word_embeddings=tied, max_position_embeddings=128, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied, kv_heads, head_dim", [(False, 4, 16), (True, 2, 32)])
def test_forward_flops_match_torch_flop_counter(tied, kv_heads, head_dim):
    # eager attention computes every (query, key) pair, masked or not: n * n pairs for n tokens
    model = _llama(tied, kv_heads, head_dim)
    shape = ModelShape.of(model)
    assert shape.attention_width == 4 * head_dim and shape.vocab == 300 and shape.hidden == 64
    tokens = 24
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.randint(0, 300, (1, tokens)), use_cache=False)
    # the counter also sees the rotary embedding's small matmul (head_dim / 2 x tokens), hence the tolerance
    assert counter.get_total_flops() == pytest.approx(forward_flops(shape, tokens, tokens, tokens * tokens), rel=2e-3)


def test_causal_pairs_and_generation_by_hand():
    assert causal_pairs(3) == 1 + 2 + 3
    assert causal_pairs(3, context=2) == 3 + 4 + 5
    shape = ModelShape(block_weights=1000, layers=2, attention_width=8, vocab=50, hidden=4)
    per_token, per_logit, per_pair = 2 * 1000, 2 * 50 * 4, 4 * 2 * 8
    assert forward_flops(shape, 5, 2, 7) == 5 * per_token + 2 * per_logit + 7 * per_pair
    # a 4-token text: 4 tokens, logits at 3 positions, 10 causal pairs
    assert scoring_flops(shape, 4) == 4 * per_token + 3 * per_logit + 10 * per_pair
    # a 5-token prompt whose first 3 tokens are cached: 2 tokens seeing 4 and 5 keys, one logit
    assert prefill_flops(shape, 5, prefix_tokens=3) == 2 * per_token + per_logit + 9 * per_pair
    # 3 new tokens after a 5-token prompt: the prefill, then steps feeding new tokens 1 and 2 (6 and 7 keys)
    expected = prefill_flops(shape, 5) + 2 * (per_token + per_logit) + (6 + 7) * per_pair
    assert generation_flops(shape, 5, 3) == expected
    assert generation_flops(shape, 5, 1) == prefill_flops(shape, 5)
