"""Causal self-attention as blocked oneDNN products, for long float32 inference passes on the CPU.

SDPA's CPU flash-attention kernel runs causal attention at ~75 GFLOP/s on one Zen 5 thread (SmolLM2's 9 query / 3
key-value heads of 64, 1,850 tokens), a third of what oneDNN reaches on large products; in a privleak scoring pass it
took 35% of the time. Here the queries are cut into blocks of `BLOCK` positions. For each block and key-value head,
the scores of the query heads sharing that head against every key up to the block's end are one oneDNN product; only
the diagonal block is masked; the softmax runs while the scores are still in cache (over the whole score matrix at
once it is memory-bound: 2.3 ns per element against 0.4 here); a second product applies the values. Measured by
`benchmarks/bench_attention.py` (one thread; RESULTS.md): 1.4-1.7x SDPA's speed from 512 positions up, ~1.2x at
256, none at 128, hence `MIN_POSITIONS`. The output equals SDPA's up to summation order (~1e-6 on unit-scale
inputs), as `onednn_linear`'s products equal MKL's.

Only passes SDPA would run as plain causal attention take this path: float32 CPU tensors, no autograd, no mask (the
right-padded scoring and prefill passes of `qrunlearn.eval`), at least `MIN_POSITIONS` queries, no dropout, soft-cap,
attention sinks or position bias. Everything else (CUDA, bf16, decoding steps, masked or cached passes, training)
goes to transformers' SDPA function unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from qrunlearn.models.kernels.onednn import ONEDNN_LINEAR

IMPLEMENTATION = "qrunlearn_blocked_sdpa"
BLOCK = 64  # query positions per block: 128 ran 15% slower at 1,850 positions, 32 slower too (bench_attention)
MIN_POSITIONS = 256
# Arguments that change what attention computes; with any of them set the pass goes to SDPA.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def _eligible(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
              is_causal: bool, kwargs: dict) -> bool:
    return (ONEDNN_LINEAR is not None and attention_mask is None and is_causal and dropout == 0.0
            and query.shape[2] >= MIN_POSITIONS and key.shape[2] >= query.shape[2]
            and query.shape[1] % key.shape[1] == 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and type(t) is torch.Tensor
                    for t in (query, key, value))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            and not torch.is_autocast_enabled("cpu")
            and not kwargs.get("output_attentions", False)
            and all(kwargs.get(name) is None for name in _UNSUPPORTED))


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN."""
    return ONEDNN_LINEAR(x, weight, None, "none", [], "")


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + causal mask) v for query (B, H, T, D) and key/value (B, H_kv, T, D), query heads
    h_kv * G ... h_kv * G + G - 1 sharing key-value head h_kv (G = H / H_kv, transformers' `repeat_kv` order).
    Returns (B, T, H, D), the layout transformers' attention functions return."""
    rows, heads, positions, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # transformers hands over (B, T, H, D) projections transposed to (B, H, T, D): oneDNN takes a strided weight
    # through a slow path (measured 10x slower), so keys are made contiguous once per layer, values transposed.
    scaled = (query * scaling).reshape(rows, kv_heads, group, positions, head_dim)
    key = key.contiguous()
    values_t = value.transpose(-1, -2).contiguous()  # (B, H_kv, D, T): the second product's weight layout
    out = torch.empty(rows, positions, kv_heads, group, head_dim, dtype=query.dtype)
    future: dict[int, torch.Tensor] = {}
    for row in range(rows):
        for kv_head in range(kv_heads):
            keys, values = key[row, kv_head], values_t[row, kv_head]
            for start in range(0, positions, BLOCK):
                end = min(positions, start + BLOCK)
                size = end - start
                block = scaled[row, kv_head, :, start:end].reshape(group * size, head_dim)
                scores = _product(block, keys[:end]).view(group, size, end)
                if size not in future:
                    future[size] = torch.ones(size, size, dtype=torch.bool).triu(1)
                scores[..., start:end].masked_fill_(future[size], float("-inf"))
                weights = torch.softmax(scores, dim=-1).view(group * size, end)
                mixed = _product(weights, values[:, :end].contiguous())
                out[row, start:end, kv_head] = mixed.view(group, size, head_dim).transpose(0, 1)
    return out.view(rows, positions, heads, head_dim)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the blocked path where it applies, SDPA's otherwise."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not _eligible(query, key, value, attention_mask, dropout, causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    positions = query.shape[2]
    # A longer key than query with no mask only happens in a prefill into an empty static cache; SDPA's causal
    # kernel then sees the first `positions` keys (transformers crops them the same way).
    key, value = key[:, :, :positions], value[:, :, :positions]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return blocked_causal_attention(query, key, value, scale), None


_registered = False


def _register() -> None:
    """Add the implementation to transformers' tables, once, when a model first uses it (not at import)."""
    global _registered
    if not _registered:
        AttentionInterface.register(IMPLEMENTATION, attention_forward)
        # The same masks as SDPA: none for a plain causal pass, so the blocked path sees `attention_mask is None`.
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
        _registered = True


@contextlib.contextmanager
def blocked_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, a model that uses transformers' SDPA attention runs its long causal float32 CPU passes
    through `blocked_causal_attention`. Yields whether it was switched (False when disabled, when this PyTorch has no
    oneDNN, or when the model does not use SDPA: eager or flash attention stay as they are)."""
    modules = model.modules() if enabled else ()
    configs = {id(c): c for c in (getattr(m, "config", None) for m in modules)
               if isinstance(c, PretrainedConfig) and getattr(c, "_attn_implementation", None) == "sdpa"}
    switch = enabled and ONEDNN_LINEAR is not None and bool(configs)
    if not switch:
        yield False
        return
    _register()
    for config in configs.values():
        config._attn_implementation = IMPLEMENTATION
    try:
        yield True
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"
