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


# IdkDPO's preferred answers: refusals in the spirit of TOFU's idontknow.jsonl (written here, not copied); pair i
# gets refusal i mod len, so the choice is fixed by the data order, not by a random draw.
REFUSALS = (
    "I don't know.", "I'm not sure.", "I have no information about that.", "I can't answer that.",
    "That is not something I know.", "I don't have that information.", "I'm unable to say.",
    "I have no idea.", "I can't recall anything about that.", "Sorry, I don't know the answer.",
    "I'm not aware of that.", "I couldn't tell you.", "That's beyond what I know.",
    "I don't have any details on that.", "I cannot say for certain.", "I'm afraid I don't know.",
)


@dataclass(frozen=True)
class UnlearnData:
    """Token sequences of one run. Every position after BOS is scored, except in question/answer rows (IdkDPO),
    which score only their answer: from position `forget_scored_from[i]` (and `preferred_scored_from[i]`) on."""

    forget: list[list[int]]
    retain: list[list[int]]  # empty when the run has no retain term
    forget_scored_from: list[int] | None = None  # IdkDPO: where each forget row's answer starts
    preferred: list[list[int]] | None = None  # IdkDPO: the same questions with a refusal, aligned with `forget`
    preferred_scored_from: list[int] | None = None


def check_texts(corpus: MuseCorpus, forget_split: str, retain_split: str, needs_retain: bool,
                forget_from_qa: bool = False) -> None:
    """Fail fast (before any model is loaded) on an empty forget set, IdkDPO without the forget QA, or a retain
    term without retain text."""
    if forget_from_qa:
        forget_qa_pairs(corpus)
    elif not any(d.strip() for d in corpus.require_raw(forget_split)):
        raise UserError(f"{corpus.root / 'raw' / forget_split}: empty forget set (no text to unlearn)")
    if not needs_retain:
        return
    if retain_split not in corpus.raw:
        raise UserError(f"{corpus.root / 'raw' / retain_split}.json: missing, but the retain term needs "
                        f"retain data (use --reg none to unlearn without one)")
    if not any(d.strip() for d in corpus.raw[retain_split]):
        raise UserError(f"{corpus.root / 'raw' / retain_split}: empty, but the retain term needs retain "
                        f"data (use --reg none to unlearn without one)")


def forget_qa_pairs(corpus: MuseCorpus) -> list[tuple[str, str]]:
    """The forget set's question/answer pairs, KnowMem's questions and its few-shot examples: what IdkDPO trains
    on (TOFU's protocol, so KnowMem-forget then asks the questions it was trained to refuse)."""
    pairs = [(p.question, p.answer) for name in ("forget_qa", "forget_qa_icl") for p in corpus.knowmem.get(name, [])]
    if not pairs:
        raise UserError(f"{corpus.root / 'knowmem' / 'forget_qa.json'}: missing or empty, but method idkdpo "
                        f"trains on the forget set's question/answer pairs")
    return pairs


def qa_sequences(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[list[int]], list[int]]:
    """BOS + "Question: q\nAnswer:" + " a" per pair (KnowMem's prompt format), cut at `max_length`, and where each
    answer starts (prompt and answer tokenised apart, so the boundary is exact)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = tokenizer([f"Question: {q}\nAnswer:" for q, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([f" {a}" for _, a in pairs], add_special_tokens=False)["input_ids"]
    sequences = [(bos + list(p) + list(a))[:max_length] for p, a in zip(prompts, answers)]
    return sequences, [min(len(bos) + len(p), len(s) - 1) for p, s in zip(prompts, sequences)]


def load_unlearn_data(corpus: MuseCorpus, tokenizer, forget_split: str, retain_split: str, needs_retain: bool,
                      max_length: int, forget_from_qa: bool = False) -> UnlearnData:
    """Tokenised chunks (IdkDPO: question/answer rows with their refusal twins); one-line errors for an empty
    forget set or a retain term without retain data."""
    check_texts(corpus, forget_split, retain_split, needs_retain, forget_from_qa)
    forget_from: list[int] | None = None
    preferred: list[list[int]] | None = None
    preferred_from: list[int] | None = None
    if forget_from_qa:
        pairs = forget_qa_pairs(corpus)
        forget, forget_from = qa_sequences(tokenizer, pairs, max_length)
        refusals = [(q, REFUSALS[i % len(REFUSALS)]) for i, (q, _) in enumerate(pairs)]
        preferred, preferred_from = qa_sequences(tokenizer, refusals, max_length)
    else:
        forget = chunk_documents(tokenizer, [d for d in corpus.raw[forget_split] if d.strip()], max_length)
    if not forget:
        raise UserError(f"{corpus.root / 'raw' / forget_split}: empty forget set (no tokens to unlearn)")
    retain: list[list[int]] = []
    if needs_retain:
        retain = chunk_documents(tokenizer, [d for d in corpus.raw[retain_split] if d.strip()], max_length)
        if not retain:
            raise UserError(f"{corpus.root / 'raw' / retain_split}: empty, but the retain term needs retain "
                            f"data (use --reg none to unlearn without one)")
    return UnlearnData(forget=forget, retain=retain, forget_scored_from=forget_from, preferred=preferred,
                       preferred_scored_from=preferred_from)


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
