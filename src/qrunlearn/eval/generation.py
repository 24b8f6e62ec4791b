"""Batched greedy decoding with a KV cache, for any Hugging Face causal LM (plain, quantized or merged).

Prompts are right-padded for the prefill pass, which then needs no attention mask (a real token never attends
to the pads after it) and takes SDPA's causal kernel; each row's first new token comes from its last real
position. New tokens are appended after the padded block, the pads masked out and position ids continuing from
each row's own length, so a padded row sees exactly the keys and positions it would see alone. Rows stop at
an end-of-sequence token (as `model.generate` does) or, when a `should_stop` test is given, as soon as the text
generated so far settles the final answer (KnowMem's stop strings), which saves the remaining steps without
changing the cut text.

Prompts that share a long token prefix (KnowMem's ten few-shot examples) compute that prefix's keys and values
once; each batch copies the cache and runs only its own suffixes. The prefix is found on the token ids of the
full prompts, so tokenisation is exactly that of each whole prompt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from qrunlearn.models.heads import head_set_aside
from qrunlearn.models.runtime import SequenceModel

logger = logging.getLogger("qrunlearn.eval")


def _cache_argument_name() -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated); use whichever the
    # installed version's outputs carry.
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


_CACHE_ARG = _cache_argument_name()

# Most positions (rows x longest row) one prefill or scoring forward pass takes; a batch over it runs as several
# passes of fewer rows. A pass's activations (e.g. SmolLM2's MLP: positions x 1,536 floats) then stay in the CPU's
# last-level cache, where the elementwise work between the products (SiLU, products, norms, rotary) is memory-bound
# otherwise (measured on SmolLM2: benchmarks/RESULTS.md, "Kernel measurements quoted from the code"). On CUDA,
# larger passes fill the device.
PASS_POSITIONS = {"cuda": 1 << 16, "cpu": 1 << 11}


def input_device(model) -> torch.device:
    """Where inputs must go: the input embeddings' device (quantized linears may hold no float weights); the CPU
    for a model run outside torch, whose logits come back there."""
    if isinstance(model, SequenceModel):
        return torch.device("cpu")
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def context_length(model, override: int | None = None) -> int | None:
    """The model's maximum sequence length (None when the config does not say)."""
    if override is not None:
        return override
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids `model.generate` stops on: the generation config's eos (int or list), else the tokenizer's."""
    generation_config = getattr(model, "generation_config", None)
    value = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def pad_token_id(tokenizer, eos_ids: Sequence[int]) -> int:
    """Any valid id works as padding (it is masked out); prefer the tokenizer's pad token."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(eos_ids[0]) if eos_ids else 0


@dataclass(frozen=True)
class Encoded:
    """Token ids per text and whether each was truncated to fit the model's context."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)


def _keeps_bos(tokenizer, ids: list[int]) -> bool:
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def encode(tokenizer, texts: Sequence[str], max_tokens: int | None, keep: str) -> Encoded:
    """Tokenise with special tokens (BOS for Llama, as MUSE does). Texts longer than `max_tokens` keep their
    last tokens (`keep="last"`, for prompts: the model continues the end) or their first (`keep="first"`,
    for scored texts); a leading BOS is kept in both cases."""
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', not {keep!r}")
    all_ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    out_ids: list[list[int]] = []
    truncated: list[bool] = []
    for ids in all_ids:
        ids = list(ids)
        if max_tokens is None or len(ids) <= max_tokens:
            out_ids.append(ids)
            truncated.append(False)
            continue
        if keep == "first":
            out_ids.append(ids[:max_tokens])
        elif _keeps_bos(tokenizer, ids):
            out_ids.append(ids[:1] + ids[len(ids) - (max_tokens - 1):])
        else:
            out_ids.append(ids[len(ids) - max_tokens:])
        truncated.append(True)
    return Encoded(out_ids, truncated)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
            cache=None):
    """One forward pass with explicit positions and an optional KV cache (returned as `(logits, cache)`)."""
    extra = {_CACHE_ARG: cache} if cache is not None else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **extra)
    return out.logits, getattr(out, _CACHE_ARG)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, mask)` of shape (rows, longest), each sequence at the start of its row."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return input_ids, mask


@dataclass
class Prefill:
    """Final hidden states of right-padded prompts (after a shared prefix) and the cache holding their keys and
    values. `hidden[row, lengths[row] - 1]` is the state that predicts the row's first new token. `head` turns
    hidden states into logits; None when `hidden` already holds the logits (the head was not set aside)."""

    hidden: torch.Tensor  # (rows, width, hidden size or vocabulary)
    lengths: torch.Tensor  # (rows,) real tokens per row, on the CPU
    cache: Any  # a transformers Cache (static, or dynamic where a static one cannot be sized)
    head: torch.nn.Module | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.head is None else self.head(hidden)


def prefill(model, input_ids: torch.Tensor, lengths: torch.Tensor, offset: int, cache,
            direct_head: bool = True) -> Prefill:
    """Run right-padded `input_ids` (rows, width) that continue `offset` tokens already in `cache`.

    No attention mask is passed: with right padding a real token never attends to the pads after it, so causal
    attention alone gives every real position exactly its unpadded result. With nothing cached before, SDPA then
    takes its causal kernel, which skips the blocks above the diagonal; a padding mask forced the dense masked path
    over the whole cache, about twice the attention work. With `direct_head` the head is left out of the pass
    (positions whose logits are not needed cost nothing) and callers apply it to the positions they need; set it
    False for a model whose logits are not its head's output (`models.heads.head_gives_logits`)."""
    rows, width = input_ids.shape
    positions = torch.arange(offset, offset + width, device=input_ids.device).expand(rows, -1)
    with head_set_aside(model, direct_head) as head:
        hidden, cache = forward(model, input_ids, None, positions, cache)
    return Prefill(hidden=hidden, lengths=lengths, cache=cache, head=head)


# Below this many shared tokens, copying the prefix cache is not worth it.
MIN_SHARED_PREFIX = 32


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


@dataclass
class SharedPrefix:
    """Keys and values (batch size 1) of the first `length` tokens, which every prompt of a call starts with."""

    length: int
    cache: Any  # a transformers Cache whose layers expose keys and values


@torch.inference_mode()
def build_shared_prefix(model, prefix: Sequence[int]) -> SharedPrefix | None:
    """The prefix's cache, or None where the cache does not expose per-layer keys and values."""
    input_ids = torch.tensor([list(prefix)], device=input_device(model))
    cache = prefill(model, input_ids, torch.tensor([len(prefix)]), 0, cache=None).cache
    if not all(hasattr(layer, "keys") for layer in getattr(cache, "layers", [None])):
        return None  # a cache whose per-layer keys and values cannot be read back: no sharing
    return SharedPrefix(len(prefix), cache)


def new_cache(model, max_length: int, rows: int, prefix: SharedPrefix | None):
    """A preallocated (static) KV cache of `max_length` positions, holding `prefix` repeated over `rows` when
    given. A growing cache re-copies all keys and values at every step (torch.cat), which dominated decoding
    time on CPU; a static one writes each step in place."""
    cache: Cache
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_length)
    except (TypeError, ValueError, AttributeError):  # a config the static cache cannot size: grow instead
        cache = DynamicCache()
    if prefix is not None:
        for index, layer in enumerate(prefix.cache.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    return cache


def prefill_prompts(model, prompts: Sequence[Sequence[int]], pad_id: int, prefix: SharedPrefix | None,
                    room: int, direct_head: bool = True) -> Prefill:
    """`prefill` of each prompt's tokens after `prefix` (every prompt must start with the prefix and be longer),
    in a fresh cache with `room` positions left after the longest prompt."""
    shared = prefix.length if prefix is not None else 0
    suffixes = [list(p[shared:]) for p in prompts]
    if not all(suffixes):
        raise ValueError("every prompt needs at least one token after the shared prefix")
    device = input_device(model)
    input_ids, mask = right_pad(suffixes, pad_id)
    rows, width = input_ids.shape
    per_pass = max(1, PASS_POSITIONS.get(device.type, PASS_POSITIONS["cuda"]) // width)
    if per_pass >= rows or not direct_head or not _full_attention_only(model.config):
        # one pass: a model returning whole logits keeps its batch bounded by the caller; a sliding-window cache
        # keeps its keys in its own order
        cache = new_cache(model, shared + width + room, rows, prefix)
        return prefill(model, input_ids.to(device), mask.sum(-1), shared, cache, direct_head)
    parts = []
    for first in range(0, rows, per_pass):
        part_suffixes = suffixes[first:first + per_pass]
        part_ids, part_mask = right_pad(part_suffixes, pad_id)
        part_cache = new_cache(model, shared + part_ids.shape[1], len(part_suffixes), prefix)
        parts.append(prefill(model, part_ids.to(device), part_mask.sum(-1), shared, part_cache, direct_head))
    return _joined(model, parts, shared + width + room)


def _joined(model, parts: list[Prefill], max_length: int) -> Prefill:
    """One `Prefill` of all rows from passes over consecutive groups of them: hidden states and keys/values
    zero-filled past each group's own width (those positions are pads, masked out while decoding, and no caller
    reads their hidden states), the keys and values written into one fresh cache of `max_length` positions."""
    width = max(part.hidden.shape[1] for part in parts)
    hidden = torch.cat([_pad_positions(part.hidden, width, dim=1) for part in parts])
    cache = new_cache(model, max_length, hidden.shape[0], prefix=None)
    layers = [part.cache.layers for part in parts]
    cached = max(part_layers[0].keys.shape[2] for part_layers in layers)
    for index in range(len(layers[0])):
        keys = torch.cat([_pad_positions(part_layers[index].keys, cached, dim=2) for part_layers in layers])
        values = torch.cat([_pad_positions(part_layers[index].values, cached, dim=2) for part_layers in layers])
        cache.update(keys, values, index)
    return Prefill(hidden=hidden, lengths=torch.cat([part.lengths for part in parts]), cache=cache,
                   head=parts[0].head)


def _full_attention_only(config) -> bool:
    return (getattr(config, "sliding_window", None) is None
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))


def _pad_positions(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


@contextlib.contextmanager
def intra_op_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """Torch's intra-op thread count set to `threads` inside the block, on CPU (unchanged for None or elsewhere)."""
    previous = torch.get_num_threads()
    if threads is None or device.type != "cpu" or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                   eos_ids: Sequence[int], should_stop: Callable[[list[int]], bool] | None = None,
                   prefix: SharedPrefix | None = None, decode_threads: int | None = None) -> list[list[int]]:
    """Greedy continuations of a batch of tokenised prompts. Each row's new tokens end with its eos (kept,
    like `generate`) or stop after `max_new_tokens`, or once `should_stop(tokens_so_far)` is true. With a
    `prefix`, every prompt must start with its tokens and be longer than it. `decode_threads` sets the CPU threads
    of the single-token steps (None: torch's setting; see `EvalConfig.decode_threads`)."""
    device = input_device(model)
    rows = len(prompts)
    shared = prefix.length if prefix is not None else 0
    start = prefill_prompts(model, prompts, pad_id, prefix, room=max_new_tokens)
    lengths = start.lengths.to(device)
    # the head alone: a model that transforms its logits after the head (a soft cap, a scale) does so
    # monotonically, so the greedy choice is the same
    logits = start.logits(start.hidden[torch.arange(rows, device=device), lengths - 1])
    # while decoding, the pads between a row's prompt and its new tokens stay masked out
    real = torch.arange(start.hidden.shape[1], device=device)[None] < lengths[:, None]
    mask = torch.cat([torch.ones((rows, shared), dtype=torch.long, device=device), real.long()], dim=1)
    with intra_op_threads(decode_threads, device):
        return _decode(model, logits, start.cache, mask, (shared + lengths - 1)[:, None], max_new_tokens, pad_id,
                       set(int(e) for e in eos_ids), should_stop)


def _decode(model, logits: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
            pad_id: int, eos: set[int], should_stop: Callable[[list[int]], bool] | None) -> list[list[int]]:
    """The greedy loop of `generate_batch`, from the first new token's `logits` (rows, vocab); `positions` holds
    each row's last prompt position."""
    rows = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    ones = torch.ones((rows, 1), dtype=mask.dtype, device=mask.device)
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(dim=-1).tolist()
        for row, token in enumerate(next_tokens):
            if done[row]:
                continue
            generated[row].append(token)
            if token in eos or (should_stop is not None and should_stop(generated[row])):
                done[row] = True
        if all(done) or step == max_new_tokens - 1:
            break
        # finished rows keep feeding a pad token; their outputs are ignored and cannot affect other rows
        feed = [pad_id if done[row] else next_tokens[row] for row in range(rows)]
        mask = torch.cat([mask, ones], dim=1)
        positions = positions + 1
        logits, cache = forward(model, torch.tensor(feed, device=mask.device).unsqueeze(1), mask, positions, cache)
        logits = logits[:, -1]
    return generated


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix worth sharing among `prompts` (0 when under MIN_SHARED_PREFIX or fewer than two
    prompts). Each prompt keeps at least one token outside it: that token's logits give its first new token."""
    if len(prompts) < 2:
        return 0
    length = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def shared_prefix(model, prompts: Sequence[Sequence[int]]) -> SharedPrefix | None:
    """The cache of the prefix `shared_prefix_length` finds, or None when there is none worth sharing (or the model
    runs outside torch, `models.runtime.SequenceModel`, which is given whole prompts)."""
    if isinstance(model, SequenceModel):
        return None
    length = shared_prefix_length(prompts)
    return build_shared_prefix(model, prompts[0][:length]) if length else None


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                    eos_ids: Sequence[int], batch_size: int,
                    should_stop: Callable[[list[int]], bool] | None = None, prefix: SharedPrefix | None = None,
                    decode_threads: int | None = None, progress: bool = False,
                    desc: str = "generate") -> list[list[int]]:
    """`generate_batch` over all prompts, longest first (similar lengths share a batch, so little padding),
    results returned in the input order. `prefix` (from `shared_prefix`) is a token prefix common to all prompts
    whose keys and values are computed once. A model run outside torch continues one prompt at a time."""
    if isinstance(model, SequenceModel):
        eos = set(int(e) for e in eos_ids)
        return [model.greedy(prompt, max_new_tokens, eos, should_stop)
                for prompt in tqdm(prompts, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            outputs = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, pad_id, eos_ids,
                                     should_stop, prefix, decode_threads)
            for index, tokens in zip(chunk, outputs):
                results[index] = tokens
            bar.update(len(chunk))
    return results
