"""Forget and retain sequences from MUSE's raw splits, and the batch schedule of one epoch.

Tokenisation follows MUSE's DefaultDataset: each document is tokenised without special tokens and cut into
chunks of `max_length - 1` tokens, each chunk prefixed with BOS (when the tokenizer has one); no EOS.

The schedule is a pure function of (seed, epoch, sizes): every process computes the same global order and
takes its own slice, so 1 process with batch B and 2 processes with batch B/2 see the same global batches.
An epoch is one pass over the forget chunks; retain chunks are drawn alongside from their own permutation
(cycled when retain is shorter than forget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.models.passes import length_groups


def chunk_documents(tokenizer, docs: list[str], max_length: int) -> list[list[int]]:
    """BOS + up to `max_length - 1` tokens per chunk, in document order (MUSE's chunking)."""
    bos = tokenizer.bos_token_id
    body = max_length - 1 if bos is not None else max_length
    chunks: list[list[int]] = []
    if not docs:
        return chunks
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        for start in range(0, len(ids), body):
            piece = list(ids[start:start + body])
            chunk = [bos] + piece if bos is not None else piece
            if len(chunk) >= 2:  # a lone BOS has nothing to predict
                chunks.append(chunk)
    return chunks


@dataclass(frozen=True)
class UnlearnData:
    forget: list[list[int]]
    retain: list[list[int]]  # empty when the run has no retain term


def check_texts(corpus: MuseCorpus, forget_split: str, retain_split: str, needs_retain: bool) -> None:
    """Fail fast (before any model is loaded) on an empty forget set or a retain term without retain text."""
    if not any(d.strip() for d in corpus.require_raw(forget_split)):
        raise UserError(f"{corpus.root / 'raw' / forget_split}: empty forget set (no text to unlearn)")
    if not needs_retain:
        return
    if retain_split not in corpus.raw:
        raise UserError(f"{corpus.root / 'raw' / retain_split}.json: missing, but the retain term needs "
                        f"retain data (use --reg none to unlearn without one)")
    if not any(d.strip() for d in corpus.raw[retain_split]):
        raise UserError(f"{corpus.root / 'raw' / retain_split}: empty, but the retain term needs retain "
                        f"data (use --reg none to unlearn without one)")


def load_unlearn_data(corpus: MuseCorpus, tokenizer, forget_split: str, retain_split: str, needs_retain: bool,
                      max_length: int) -> UnlearnData:
    """Tokenised chunks; one-line errors for an empty forget set or a retain term without retain data."""
    check_texts(corpus, forget_split, retain_split, needs_retain)
    forget = chunk_documents(tokenizer, [d for d in corpus.raw[forget_split] if d.strip()], max_length)
    if not forget:
        raise UserError(f"{corpus.root / 'raw' / forget_split}: empty forget set (no tokens to unlearn)")
    retain: list[list[int]] = []
    if needs_retain:
        retain = chunk_documents(tokenizer, [d for d in corpus.raw[retain_split] if d.strip()], max_length)
        if not retain:
            raise UserError(f"{corpus.root / 'raw' / retain_split}: empty, but the retain term needs retain "
                            f"data (use --reg none to unlearn without one)")
    return UnlearnData(forget=forget, retain=retain)


@dataclass(frozen=True)
class MicroBatch:
    forget: list[int]  # indices into UnlearnData.forget (this process's share)
    retain: list[int]  # indices into UnlearnData.retain (a schedule's: as many as forget, or none)


@dataclass(frozen=True)
class Step:
    """One optimizer step: this process's micro-batches and the global counts that normalise the losses."""

    micro_batches: list[MicroBatch]
    global_forget: list[int]
    global_retain: list[int]


def _permutation(n: int, seed: int, epoch: int, stream: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)
    return torch.randperm(n, generator=generator).tolist()


def epoch_schedule(n_forget: int, n_retain: int, epoch: int, seed: int, batch_size: int, grad_accum: int,
                   rank: int = 0, world_size: int = 1) -> list[Step]:
    """Optimizer steps of one epoch for process `rank`. A global batch has batch_size * grad_accum *
    world_size forget chunks; micro-batch m of rank r is slice (m * world_size + r) of it. The last global
    batch may be short; a process whose slice is empty gets an empty micro-batch (the loop runs it with
    weight 0 so DDP's gradient sync still happens)."""
    forget_order = _permutation(n_forget, seed, epoch, 0)
    retain_order: list[int] = []
    if n_retain:
        cycles = math.ceil(n_forget / n_retain)
        retain_order = [i for c in range(cycles) for i in _permutation(n_retain, seed, epoch, 1 + c)][:n_forget]
    per_step = batch_size * grad_accum * world_size
    steps: list[Step] = []
    for first in range(0, n_forget, per_step):
        global_forget = forget_order[first:first + per_step]
        global_retain = retain_order[first:first + per_step]
        micro = []
        for m in range(grad_accum):
            if m * world_size * batch_size >= len(global_forget):
                break  # a short last batch: no process has data for this micro-batch
            lo = (m * world_size + rank) * batch_size
            micro.append(MicroBatch(global_forget[lo:lo + batch_size], global_retain[lo:lo + batch_size]))
        steps.append(Step(micro, global_forget, global_retain))
    return steps


def row_groups(micro: MicroBatch, data: UnlearnData, pass_cost: int | None) -> list[MicroBatch]:
    """The forward passes that compute one micro-batch: its forget and retain rows grouped by length
    (`length_groups`), so that short chunks are not padded to the longest one. The losses are sums normalised by
    the global batch's counts, so the passes' gradients add up to the one-pass gradient (up to float summation
    order). A group may hold only forget or only retain rows. `pass_cost` None: one pass, as scheduled."""
    if pass_cost is None:
        return [micro]
    lengths = [len(data.forget[i]) for i in micro.forget] + [len(data.retain[i]) for i in micro.retain]
    n = len(micro.forget)
    return [MicroBatch([micro.forget[r] for r in group if r < n], [micro.retain[r - n] for r in group if r >= n])
            for group in length_groups(lengths, pass_cost)]
