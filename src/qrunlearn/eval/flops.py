"""The floating-point work an evaluation needs, counted from token counts: the numerator of model FLOP utilisation.

A forward pass over `tokens` new tokens costs 2 FLOPs per weight of the transformer blocks' linear layers per token,
2 x vocabulary x hidden per position whose logits are needed (the output head), and 4 x attention width per
(query, key) pair per layer (Q.K^T, then the weights times V). Only pairs a causal model actually needs count: a
token attends to the cached context and to the new tokens up to itself. Work that batching adds (pads, masked
blocks, unused cache slots) is not counted, so the utilisation says how close a schedule comes to the work itself.
Norms, activations and rotary embeddings are left out (well under 1% of the total for a Llama).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qrunlearn.typing import HFModel


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP count depends on."""

    block_weights: int  # weights of the linear layers outside the embeddings and the output head
    layers: int
    attention_width: int  # query heads x head dimension
    vocab: int
    hidden: int  # the output head's input width

    @classmethod
    def of(cls, model: HFModel) -> ModelShape:
        """Read from a Hugging Face causal LM (plain or merged; quantized layers are not `nn.Linear`)."""
        head = model.get_output_embeddings()
        weights = sum(module.weight.numel() for module in model.modules()
                      if isinstance(module, nn.Linear) and module is not head)
        config = model.config
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        vocab, hidden = head.weight.shape
        return cls(block_weights=weights, layers=int(config.num_hidden_layers), attention_width=heads * head_dim,
                   vocab=int(vocab), hidden=int(hidden))


def causal_pairs(tokens: int, context: int = 0) -> int:
    """(query, key) pairs of `tokens` new tokens after `context` cached ones: token i sees context + i + 1 keys."""
    return tokens * context + tokens * (tokens + 1) // 2


def forward_flops(shape: ModelShape, tokens: int, logits_positions: int, attended_pairs: int) -> int:
    """FLOPs of one forward pass (see the module docstring)."""
    return (2 * shape.block_weights * tokens + 2 * shape.vocab * shape.hidden * logits_positions
            + 4 * shape.layers * shape.attention_width * attended_pairs)


def scoring_flops(shape: ModelShape, tokens: int) -> int:
    """Log-probs of every token of a text after the first: one causal pass, logits at all but the last position."""
    return forward_flops(shape, tokens, tokens - 1, causal_pairs(tokens))


def prefill_flops(shape: ModelShape, prompt_tokens: int, prefix_tokens: int = 0) -> int:
    """A prompt's pass after `prefix_tokens` already cached, with the logits of its last position only."""
    new = prompt_tokens - prefix_tokens
    return forward_flops(shape, new, 1, causal_pairs(new, prefix_tokens))


def generation_flops(shape: ModelShape, prompt_tokens: int, new_tokens: int, prefix_tokens: int = 0) -> int:
    """Greedy generation of `new_tokens` (>= 1) after a prompt: its prefill, then one single-token step per new
    token but the last (the last token's logits are never needed)."""
    steps = max(0, new_tokens - 1)
    decode_pairs = steps * prompt_tokens + steps * (steps + 1) // 2  # step j attends to prompt + j + 1 keys
    return (prefill_flops(shape, prompt_tokens, prefix_tokens)
            + forward_flops(shape, steps, steps, decode_pairs))
