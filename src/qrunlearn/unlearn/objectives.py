"""Unlearning objectives as pure functions (paper.md's definitions), in two layers:

1. per-position statistics of a batch: the NLL of each next token, and KL(p_ref || p_theta) at each position;
   from full logits (`token_nll`, `token_kl`) or, for large vocabularies, chunk by chunk from the final hidden
   states without ever holding the whole batch's fp32 logits (`qrunlearn.unlearn.chunked`);
2. the losses built from them (`*_from_tokens`), which therefore do not care how the statistics were computed.

The logits-level functions (`ga_loss`, `npo_loss`, ...) compose the two for callers holding logits.

Conventions: `logits` is [B, T, V] from a causal LM on `input_ids` [B, T]; `labels` is [B, T] with -100 on
padding (and anything else not to score). Position t predicts token t+1, so statistics have T - 1 positions.

Each loss is a mean, and its denominator can be given from outside (`num_tokens` / `num_sequences`): the
training loop passes the count of the whole *global* batch (all micro-batches of an optimizer step on all
processes), so gradient accumulation and DDP give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---- per-position statistics --------------------------------------------------------------------------------------
def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits[:, :-1], labels[:, 1:], mask of scored positions)."""
    next_labels = labels[:, 1:]
    return logits[:, :-1], next_labels, next_labels != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T-1] (0 on masked positions) and the mask, in fp32.

    Scored at all T positions against the labels shifted left (the last position scores nothing), and only the
    [B, T] result is cut to T - 1: slicing the [B, T, V] logits instead would copy them in the forward pass and
    zero-fill a full-size gradient in the backward pass (in a SmolLM2 step's profile, copies and fills fell from
    4.8 s to 3.8 s of ~32 s)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)
    return nll[:, :-1], targets[:, :-1] != IGNORE_INDEX


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(p_ref || p_theta) [B, T-1] over the next-token distributions (unmasked) and the mask, from
    log-softmax of both (not raw logits); formed at all T positions and then cut, as `token_nll`."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_ref = F.log_softmax(ref_logits.float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)[:, :-1], labels[:, 1:] != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL [B] (= -log pi(x)) and per-sequence scored-token counts [B]."""
    return sequence_sums(*token_nll(logits, labels))


def sequence_sums(nll: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of a per-position statistic (0 on padding) and the rows' scored-token counts. Summed in fp64
    and rounded once to fp32, so a sequence's sum does not depend on how wide its batch was padded (a fp32
    reduction over a wider row groups its additions differently): NPO's log-ratio at step 0 is then exactly 0."""
    return nll.double().sum(dim=1).to(nll.dtype), mask.sum(dim=1)


# ---- losses from the statistics ---------------------------------------------------------------------------------
def _denominator(given: float | None, local: torch.Tensor) -> torch.Tensor | float:
    return local.clamp(min=1) if given is None else given


def nll_from_tokens(nll: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-mean NLL (what HF's `model(...).loss` is; GDR's retain loss). `nll` is 0 on masked positions."""
    return nll.sum() / _denominator(num_tokens, mask.sum())


def npo_from_sequences(nll: torch.Tensor, ref_sequence_nll: torch.Tensor, beta: float,
                       num_sequences: float | None = None) -> torch.Tensor:
    """NPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) - NLL_ref(x))), NLLs summed over
    each sequence's tokens. At theta = ref its gradient is that of -mean_x NLL_theta(x) (GA on summed NLL)."""
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_sequence_nll.to(nll)))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def simnpo_from_sequences(nll: torch.Tensor, count: torch.Tensor, beta: float, delta: float = 0.0,
                          num_sequences: float | None = None) -> torch.Tensor:
    """SimNPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) / |x| - delta)), |x| the
    number of scored tokens; no reference model."""
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll / count.clamp(min=1) - delta))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def kl_from_tokens(kl: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """KLR: token-mean KL(p_ref || p_theta) over the scored positions, padding masked."""
    return (kl * mask).sum() / _denominator(num_tokens, mask.sum())


def combine(forget: torch.Tensor | None, retain: torch.Tensor | None, gamma: float, alpha: float) -> torch.Tensor:
    """loss = gamma * forget + alpha * retain (a term is None when it is absent: no retain term, or a forward pass
    over retain rows only)."""
    if forget is None:
        if retain is None:
            raise ValueError("combine: no forget and no retain term")
        return alpha * retain
    return gamma * forget if retain is None else gamma * forget + alpha * retain


# ---- the same losses from logits ----------------------------------------------------------------------------------
def nll_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    return nll_from_tokens(*token_nll(logits, labels), num_tokens=num_tokens)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Gradient ascent: -NLL (token mean, as MUSE and open-unlearning use the model's loss)."""
    return -nll_loss(logits, labels, num_tokens)


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_sequence_nll: torch.Tensor, beta: float,
             num_sequences: float | None = None) -> torch.Tensor:
    return npo_from_sequences(sequence_nll(logits, labels)[0], ref_sequence_nll, beta, num_sequences)


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float = 0.0,
                num_sequences: float | None = None) -> torch.Tensor:
    nll, count = sequence_nll(logits, labels)
    return simnpo_from_sequences(nll, count, beta, delta, num_sequences)


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
            num_tokens: float | None = None) -> torch.Tensor:
    return kl_from_tokens(*token_kl(logits, ref_logits, labels), num_tokens=num_tokens)
