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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from qrunlearn.eval.generation import PASS_POSITIONS, SharedPrefix, input_device, prefill_prompts, right_pad
from qrunlearn.models.heads import head_gives_logits, head_set_aside

MIN_K_RATIOS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
PRIVLEAK_RATIO = 0.4
MIN_K_PP_RATIO = 0.4
# Logits elements (positions x vocabulary) turned into statistics at once. Small enough that the chunk's logits and
# their temporaries stay in the CPU's caches, large enough for an efficient head matmul. Measured on SmolLM2 (49k
# vocabulary), 1 thread, head + statistics of a 1.8k-token text: MKL 1.7 s in chunks of 128 positions vs 2.3 s
# whole; oneDNN 1.4 s for 64-128 positions, 1.6 s for 192-256.
_STATS_ELEMENT_BUDGET = {"cuda": 1 << 26, "cpu": 1 << 22}
# Most logits elements (positions x vocabulary) of one pass for models whose logits are not their head's output
# (`models.heads.head_gives_logits`), which return them whole.
_FULL_LOGITS_BUDGET = {"cuda": 1 << 29, "cpu": 1 << 26}


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


def distribution_stats(logits: torch.Tensor, targets: torch.Tensor,
                       with_distribution: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For logits (positions, vocab): log p(target) and, with `with_distribution`, the mean and standard deviation
    of log p(v) under p itself, all in float32 (None when not asked for)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    logprob = log_p.gather(-1, targets[:, None]).squeeze(-1)
    if not with_distribution:
        return logprob, None, None
    p = log_p.exp()
    mean = (p * log_p).sum(-1)
    # two-pass variance: E[x^2] - E[x]^2 cancels badly in float32 and made batched != unbatched
    sigma = (p * (log_p - mean[..., None]).square()).sum(-1).sqrt()
    return logprob, mean, sigma


def _head_rows(head: torch.nn.Module) -> int:
    weight = getattr(head, "weight", None)
    # an unknown head is assumed to have a large vocabulary, which only makes the chunks smaller
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 1 << 17


def token_stats(outputs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_distribution: bool = True, head: torch.nn.Module | None = None) -> TokenStats:
    """Statistics of a right-padded batch from a forward pass's `outputs` (rows, length, ·): its logits, or, with
    `head`, its final hidden states, to which the head is applied a chunk of positions at a time so that the
    batch's logits never exist at once. Only real positions are computed (pads keep log p 0, mu 0, sigma 1), in
    chunks small enough for the vocabulary-sized temporaries to stay in cache."""
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].bool()
    rows, positions = targets.shape
    vocab = outputs.shape[-1] if head is None else _head_rows(head)
    budget = _STATS_ELEMENT_BUDGET.get(outputs.device.type, _STATS_ELEMENT_BUDGET["cuda"])
    chunk = max(1, budget // vocab)
    logprob = torch.zeros((rows, positions), dtype=torch.float32, device=outputs.device)
    mu = torch.zeros_like(logprob)
    sigma = torch.ones_like(logprob)
    for row, real in enumerate(mask.sum(-1).tolist()):
        for start in range(0, real, chunk):
            stop = min(real, start + chunk)
            logits = outputs[row, start:stop] if head is None else head(outputs[row, start:stop])
            values, mean, spread = distribution_stats(logits, targets[row, start:stop], with_distribution)
            logprob[row, start:stop] = values
            if mean is not None and spread is not None:
                mu[row, start:stop] = mean
                sigma[row, start:stop] = spread
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


def _length_batches(order: list[int], token_ids: Sequence[Sequence[int]], batch_size: int,
                    budget: int) -> Iterator[list[int]]:
    """Consecutive slices of `order` (longest first): at most `batch_size` rows and, beyond one row, at most
    `budget` positions (rows x the slice's longest text)."""
    first = 0
    while first < len(order):
        rows = min(batch_size, max(1, budget // len(token_ids[order[first]])))
        yield order[first:first + rows]
        first += rows


@torch.inference_mode()
def score_texts(model, token_ids: Sequence[Sequence[int]], zlib_lengths: Sequence[int], pad_id: int,
                batch_size: int, with_extra: bool = True, progress: bool = False,
                desc: str = "log-probs") -> dict[str, np.ndarray]:
    """MIA scores of tokenised texts (each at least 2 tokens), batched by similar length; arrays in input
    order. Texts are right-padded and no attention mask is passed: a real token never attends to the pads after
    it, so causal attention alone gives every real position its unpadded result, and SDPA takes its causal
    kernel (a padding mask forced the dense path: twice the attention work)."""
    if any(len(ids) < 2 for ids in token_ids):
        raise ValueError("every scored text needs at least two tokens")
    device = input_device(model)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    direct = head_gives_logits(model)
    budget = PASS_POSITIONS.get(device.type, PASS_POSITIONS["cuda"])
    if not direct:  # the pass returns the whole batch's logits: bound them instead
        logits_budget = _FULL_LOGITS_BUDGET.get(device.type, _FULL_LOGITS_BUDGET["cuda"])
        budget = max(1, logits_budget // int(model.config.vocab_size))
    columns: dict[str, np.ndarray] = {}
    with tqdm(total=len(order), desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for chunk in _length_batches(order, token_ids, batch_size, budget):
            input_ids, mask = right_pad([token_ids[i] for i in chunk], pad_id)
            input_ids, mask = input_ids.to(device), mask.to(device)
            positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
            with head_set_aside(model, direct) as head:
                outputs = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
            stats = token_stats(outputs, input_ids, mask, with_distribution=with_extra, head=head)
            del outputs
            zl = torch.tensor([zlib_lengths[i] for i in chunk], dtype=torch.float64)
            for name, values in mia_scores(stats, zl, with_extra=with_extra).items():
                column = columns.setdefault(name, np.empty(len(token_ids), dtype=np.float64))
                column[chunk] = values.cpu().numpy()
            bar.update(len(chunk))
    return columns


@torch.inference_mode()
def answer_nll(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
               batch_size: int, prefix: SharedPrefix | None = None) -> np.ndarray:
    """Mean NLL per answer token of each answer given its prompt (teacher forcing: prompt ids + answer ids, as the
    model would have to generate them). The head is applied to the answer positions only, so no full-vocabulary
    logits exist for the prompts. With `prefix` (the few-shot block every KnowMem prompt starts with, as
    `generation.shared_prefix` finds it), only the tokens after it are run."""
    device = input_device(model)
    shared = prefix.length if prefix is not None else 0
    direct = head_gives_logits(model)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    out = np.empty(len(prompts), dtype=np.float64)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        texts = [list(prompts[i]) + list(answers[i]) for i in chunk]
        run = prefill_prompts(model, texts, pad_id, prefix, room=0, direct_head=direct)
        for row, index in enumerate(chunk):
            start, length = len(prompts[index]) - shared, len(answers[index])
            logits = run.logits(run.hidden[row, start - 1:start - 1 + length]).float()
            targets = torch.tensor(list(answers[index]), device=device)
            out[index] = float(torch.nn.functional.cross_entropy(logits, targets, reduction="mean"))
    return out
