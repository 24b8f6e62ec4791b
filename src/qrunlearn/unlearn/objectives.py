"""Unlearning objectives as pure functions of logits, labels and masks (paper.md's definitions).

Conventions: `logits` is [B, T, V] from a causal LM on `input_ids` [B, T]; `labels` is [B, T] with -100 on
padding (and anything else not to score). Position t predicts token t+1, so every function shifts once.

Each loss is a mean, and its denominator can be given from outside (`num_tokens` / `num_sequences`): the
training loop passes the count of the whole *global* batch (all micro-batches of an optimizer step on all
processes), so gradient accumulation and DDP give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits[:, :-1], labels[:, 1:], mask of scored positions)."""
    next_labels = labels[:, 1:]
    return logits[:, :-1], next_labels, next_labels != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T-1] (0 on masked positions) and the mask, in fp32."""
    shifted, targets, mask = shift(logits, labels)
    # flattened [N, V] rows: cross_entropy on a [B, V, T] transposed view is ~4x slower on CPU
    nll = F.cross_entropy(shifted.float().reshape(-1, shifted.shape[-1]), targets.masked_fill(~mask, 0).reshape(-1),
                          reduction="none").view(targets.shape)
    return nll * mask, mask


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL [B] (= -log pi(x)) and per-sequence scored-token counts [B]."""
    nll, mask = token_nll(logits, labels)
    return nll.sum(dim=1), mask.sum(dim=1)


def _denominator(given: float | None, local: torch.Tensor) -> torch.Tensor | float:
    return local.clamp(min=1) if given is None else given


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-mean NLL over the batch (what HF's `model(...).loss` is; GDR's retain loss)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / _denominator(num_tokens, mask.sum())


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Gradient ascent: -NLL (token mean, as MUSE and open-unlearning use the model's loss)."""
    return -nll_loss(logits, labels, num_tokens)


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_sequence_nll: torch.Tensor, beta: float,
             num_sequences: float | None = None) -> torch.Tensor:
    """NPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) - NLL_ref(x))), NLLs summed over
    each sequence's tokens. At theta = ref its gradient is that of -mean_x NLL_theta(x) (GA on summed NLL)."""
    nll, _ = sequence_nll(logits, labels)
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_sequence_nll.to(nll)))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float = 0.0,
                num_sequences: float | None = None) -> torch.Tensor:
    """SimNPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) / |x| - delta)), |x| the
    number of scored tokens; no reference model."""
    nll, count = sequence_nll(logits, labels)
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll / count.clamp(min=1) - delta))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
            num_tokens: float | None = None) -> torch.Tensor:
    """KLR: token-mean KL(p_ref || p_theta) over the next-token distributions at scored positions, from
    log-softmax of both (not raw logits), padding masked."""
    shifted, _, mask = shift(logits, labels)
    ref_shifted = ref_logits[:, :-1]
    log_p = F.log_softmax(shifted.float(), dim=-1)
    log_ref = F.log_softmax(ref_shifted.float(), dim=-1)
    per_position = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)
    return (per_position * mask).sum() / _denominator(num_tokens, mask.sum())


def combine(forget: torch.Tensor, retain: torch.Tensor | None, gamma: float, alpha: float) -> torch.Tensor:
    """loss = gamma * forget + alpha * retain (retain None when there is no retain term)."""
    return gamma * forget if retain is None else gamma * forget + alpha * retain
