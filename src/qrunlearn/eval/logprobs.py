"""Token log-probabilities in one batched forward pass per batch, and the membership-inference scores built
from them (LOSS, zlib, Min-K% for several k, Min-K%++), all vectorised over tokens.

Scores follow MUSE's orientation: higher means "looks less like training data". For a text tokenised with
BOS as x_0..x_{n}, the n log-probs log p(x_t | x_<t), t >= 1, give
- loss      = mean negative log-prob (MUSE's "PPL" key; perplexity is its exp, so the same ranking);
- zlib      = loss / len(zlib.compress(text as UTF-8));
- min_k_<r> = -mean of the lowest int(r * n) log-probs (MUSE: Min-<r>%); PrivLeak uses r = 0.4;
- min_k_pp  = the same on (log p - mu) / sigma, with mu, sigma the mean and standard deviation of log p(v)
              under the model's own next-token distribution (Min-K%++, Zhang et al. 2024), r = 0.4.
When int(r * n) is 0 (texts under 1/r tokens) the lowest single log-prob is used: MUSE would take the mean
of an empty list (NaN) and its ROC call would fail.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from qrunlearn.eval.generation import input_device
from qrunlearn.models.heads import hidden_states_forward

MIN_K_RATIOS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
PRIVLEAK_RATIO = 0.4
MIN_K_PP_RATIO = 0.4
# Elements of float32 (rows x tokens x vocabulary) processed at once when turning logits into statistics.
_STATS_ELEMENT_BUDGET = 1 << 26
# Most logits elements (rows x tokens x vocabulary) one forward pass may produce: long texts with a large
# vocabulary get fewer rows per batch (a 7B Llama on 2k-token texts: 4 rows) instead of running out of memory.
# On CPU the budget is smaller: there a forward pass is compute-bound and big batches of long texts ran slower
# than small ones (measured: 16 x 512 tokens, 2.2 s batched vs 1.7 s one at a time).
_LOGITS_ELEMENT_BUDGET = {"cuda": 1 << 29, "cpu": 1 << 22}


def min_k_name(ratio: float) -> str:
    return f"min_k_{round(ratio * 100)}"


def zlib_length(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


@dataclass(frozen=True)
class TokenStats:
    """Per-position statistics of a right-padded batch; position t scores token t + 1."""

    logprob: torch.Tensor  # (rows, positions) log p(x_{t+1} | x_<=t)
    mu: torch.Tensor  # (rows, positions) E_v[log p(v)]
    sigma: torch.Tensor  # (rows, positions) std_v[log p(v)]
    mask: torch.Tensor  # (rows, positions) bool: a real next token


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_distribution: bool = True) -> TokenStats:
    """Statistics from a forward pass's logits (rows, length, vocab) of a right-padded batch. Works in float32
    in row chunks so that the vocabulary-sized temporaries stay bounded."""
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].bool()
    rows, positions = targets.shape
    vocab = logits.shape[-1]
    chunk = max(1, _STATS_ELEMENT_BUDGET // max(1, positions * vocab))
    logprob = torch.empty((rows, positions), dtype=torch.float32, device=logits.device)
    mu = torch.zeros_like(logprob)
    sigma = torch.ones_like(logprob)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        log_p = torch.log_softmax(logits[start:stop, :-1].float(), dim=-1)
        logprob[start:stop] = log_p.gather(-1, targets[start:stop, :, None]).squeeze(-1)
        if with_distribution:
            p = log_p.exp()
            mean = (p * log_p).sum(-1)
            # two-pass variance: E[x^2] - E[x]^2 cancels badly in float32 and made batched != unbatched
            mu[start:stop] = mean
            sigma[start:stop] = (p * (log_p - mean[..., None]).square()).sum(-1).sqrt()
    return TokenStats(logprob=logprob, mu=mu, sigma=sigma, mask=mask)


def _lowest_fraction_mean(values: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the lowest max(1, int(ratio * n)) masked values per row (float64), as one sort + cumsum."""
    filled = values.double().masked_fill(~mask, float("inf"))
    cumulative = filled.sort(dim=-1).values.cumsum(dim=-1)
    k = torch.floor(counts.double() * ratio).long().clamp(min=1)
    return cumulative.gather(-1, (k - 1)[:, None]).squeeze(-1) / k.double()


def mia_scores(stats: TokenStats, zlib_lengths: torch.Tensor, ratios: Sequence[float] = MIN_K_RATIOS,
               with_extra: bool = True) -> dict[str, torch.Tensor]:
    """Per-row scores (float64 on the stats' device). `with_extra=False` gives only the PrivLeak score
    (`min_k_40`) and the loss."""
    mask = stats.mask
    counts = mask.sum(-1)
    logprob = stats.logprob.double().masked_fill(~mask, 0.0)
    nll_sum = -logprob.sum(-1)
    loss = nll_sum / counts.double()
    scores: dict[str, torch.Tensor] = {"loss": loss, "nll_sum": nll_sum, "n_tokens": counts.double()}
    wanted = ratios if with_extra else (PRIVLEAK_RATIO,)
    for ratio in wanted:
        scores[min_k_name(ratio)] = -_lowest_fraction_mean(stats.logprob, mask, counts, ratio)
    if with_extra:
        scores["zlib"] = loss / zlib_lengths.double().to(loss.device)
        standardised = (stats.logprob - stats.mu) / stats.sigma.clamp_min(1e-12)
        scores["min_k_pp"] = -_lowest_fraction_mean(standardised, mask, counts, MIN_K_PP_RATIO)
    return scores


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return input_ids, mask


@torch.inference_mode()
def score_texts(model, token_ids: Sequence[Sequence[int]], zlib_lengths: Sequence[int], pad_id: int,
                batch_size: int, with_extra: bool = True, progress: bool = False,
                desc: str = "log-probs") -> dict[str, np.ndarray]:
    """MIA scores of tokenised texts (each at least 2 tokens), batched by similar length; arrays in input
    order. Right padding: real tokens never attend to the pads after them, and positions start at 0."""
    if any(len(ids) < 2 for ids in token_ids):
        raise ValueError("every scored text needs at least two tokens")
    device = input_device(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    columns: dict[str, np.ndarray] = {}
    with tqdm(total=len(order), desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        first = 0
        while first < len(order):
            budget = _LOGITS_ELEMENT_BUDGET.get(device.type, _LOGITS_ELEMENT_BUDGET["cuda"])
            rows = min(batch_size, max(1, budget // (len(token_ids[order[first]]) * vocab)))
            chunk = order[first:first + rows]
            first += rows
            input_ids, mask = right_pad([token_ids[i] for i in chunk], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
            # no padding in this batch (equal lengths, e.g. texts cut to the context): no mask, so attention can
            # take its causal fast path
            attention = None if bool(mask.all()) else mask
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           use_cache=False).logits
            stats = token_stats(logits, input_ids, mask, with_distribution=with_extra)
            del logits
            zl = torch.tensor([zlib_lengths[i] for i in chunk], dtype=torch.float64)
            for name, values in mia_scores(stats, zl, with_extra=with_extra).items():
                column = columns.setdefault(name, np.empty(len(token_ids), dtype=np.float64))
                column[chunk] = values.cpu().numpy()
            bar.update(len(chunk))
    return columns


@torch.inference_mode()
def answer_nll(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
               batch_size: int) -> np.ndarray:
    """Mean NLL per answer token of each answer given its prompt (teacher forcing: prompt ids + answer ids, as the
    model would have to generate them). The head is applied to the answer positions only, so no full-vocabulary
    logits exist for the prompts (a KnowMem prompt is ten few-shot pairs long)."""
    device = input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    out = np.empty(len(prompts), dtype=np.float64)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        input_ids, mask = right_pad([list(prompts[i]) + list(answers[i]) for i in chunk], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with hidden_states_forward(model) as head:
            hidden = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        for row, index in enumerate(chunk):
            start, length = len(prompts[index]), len(answers[index])
            logits = head(hidden[row, start - 1:start - 1 + length]).float()
            targets = input_ids[row, start:start + length]
            out[index] = float(torch.nn.functional.cross_entropy(logits, targets, reduction="mean"))
    return out
