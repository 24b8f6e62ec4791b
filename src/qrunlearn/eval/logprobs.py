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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from qrunlearn.eval.generation import PASS_POSITIONS, SharedPrefix, input_device, prefill_prompts, right_pad
from qrunlearn.models.heads import head_gives_logits, head_set_aside
from qrunlearn.models.runtime import SequenceModel

MIN_K_RATIOS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
PRIVLEAK_RATIO = 0.4
MIN_K_PP_RATIO = 0.4
# Statistics are taken a tile of logits at a time: a slice of positions times a slice of the vocabulary, merged
# across vocabulary slices as an online softmax. On the CPU a tile small enough to stay in cache (512 positions x
# 2,048 vocabulary rows) lets the head's product and every pass over its logits run from cache, and each slice of
# the head's weight serves all the tile's positions. Measured on SmolLM2 (49k vocabulary), quiet, 1 thread, oneDNN,
# head + statistics of a 2,047-position text: with the distribution's moments (Min-K%++) 1.60 s in whole-vocabulary
# chunks of 85 positions vs 0.71 s in tiles; log p alone 0.62-0.65 s vs 0.60-0.61 s. On CUDA a tile spans the whole
# vocabulary.
_STATS_TILE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 20}
_STATS_VOCAB_TILE = {"cuda": 1 << 62, "cpu": 2048}
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


@dataclass(frozen=True)
class _Moments:
    """Per position, over some vocabulary entries v with logits x_v: the largest logit `top`, the sum of
    exp(x_v - top), and with the distribution the exp(x)-weighted mean of x and weighted sum of squared deviations."""

    top: torch.Tensor
    total: torch.Tensor
    mean: torch.Tensor | None
    spread: torch.Tensor | None


def _tile_moments(logits: torch.Tensor, with_distribution: bool) -> _Moments:
    """The moments of one tile of logits (positions, vocabulary slice), two-pass within the tile."""
    top = logits.amax(-1)
    shifted = logits - top[:, None]
    weights = shifted.exp()
    total = weights.sum(-1)
    if not with_distribution:
        return _Moments(top, total, None, None)
    mean = (weights * shifted).sum(-1) / total
    # two-pass variance: E[x^2] - E[x]^2 cancels badly in float32 and made batched != unbatched
    spread = (weights * (shifted - mean[:, None]).square()).sum(-1)
    return _Moments(top, total, mean + top, spread)


def _merge_moments(a: _Moments, b: _Moments) -> _Moments:
    """The moments of two disjoint vocabulary slices together: both rescaled to the larger max, then Chan et al.'s
    pairwise update of a weighted mean and sum of squared deviations (stable where E[x^2] - E[x]^2 is not)."""
    top = torch.maximum(a.top, b.top)
    scale_a, scale_b = (a.top - top).exp(), (b.top - top).exp()
    weight_a, weight_b = a.total * scale_a, b.total * scale_b
    total = weight_a + weight_b
    if a.mean is None or b.mean is None or a.spread is None or b.spread is None:
        return _Moments(top, total, None, None)
    delta = b.mean - a.mean
    mean = a.mean + delta * weight_b / total
    spread = a.spread * scale_a + b.spread * scale_b + delta.square() * weight_a * weight_b / total
    return _Moments(top, total, mean, spread)


def distribution_stats(tiles: Iterable[tuple[int, torch.Tensor]], targets: torch.Tensor,
                       with_distribution: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For the logits of some positions, given as consecutive vocabulary slices (index of the slice's first entry,
    logits of shape (positions, slice width)): log p(target) and, with `with_distribution`, the mean and standard
    deviation of log p(v) under p itself, all in float32 (None when not asked for). The slices are merged as an
    online softmax, so the whole vocabulary's logits never need to exist at once."""
    moments: _Moments | None = None
    target_logit = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    for first, logits in tiles:
        logits = logits.float()
        width = logits.shape[-1]
        inside = (targets >= first) & (targets < first + width)
        picked = logits.gather(-1, (targets - first).clamp(0, width - 1)[:, None]).squeeze(-1)
        target_logit = torch.where(inside, picked, target_logit)
        tile = _tile_moments(logits, with_distribution)
        moments = tile if moments is None else _merge_moments(moments, tile)
    if moments is None:
        raise ValueError("distribution_stats needs at least one vocabulary slice")
    log_partition = moments.top + moments.total.log()
    logprob = target_logit - log_partition
    if moments.mean is None or moments.spread is None:
        return logprob, None, None
    # log p(v) = x_v - log_partition: the mean moves by the same amount, the spread does not
    return logprob, moments.mean - log_partition, (moments.spread / moments.total).sqrt()


def _head_rows(head: torch.nn.Module) -> int:
    weight = getattr(head, "weight", None)
    # an unknown head is assumed to have a large vocabulary, which only makes the chunks smaller
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 1 << 17


def _vocabulary_slices(outputs: torch.Tensor, head: torch.nn.Module | None, vocab: int,
                       width: int) -> Callable[[int, int], Iterator[tuple[int, torch.Tensor]]]:
    """For positions [start, stop) of one row's `outputs`: the logits in vocabulary slices of `width`, the head
    applied slice by slice. A head that is not a plain linear layer is applied whole (its output cannot be sliced)."""
    if head is None:
        def of_logits(start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
            for first in range(0, vocab, width):
                yield first, outputs[start:stop, first:first + width]
        return of_logits
    plain = type(head) is torch.nn.Linear and type(getattr(head, "weight", None)) in (torch.Tensor, torch.nn.Parameter)
    if not plain:
        def whole(start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
            yield 0, head(outputs[start:stop])
        return whole
    weight, bias = cast(torch.nn.Linear, head).weight, cast(torch.nn.Linear, head).bias

    def of_head(start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        for first in range(0, vocab, width):
            rows = slice(first, first + width)
            yield first, torch.nn.functional.linear(outputs[start:stop], weight[rows],
                                                    None if bias is None else bias[rows])
    return of_head


def token_stats(outputs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_distribution: bool = True, head: torch.nn.Module | None = None) -> TokenStats:
    """Statistics of a right-padded batch from a forward pass's `outputs` (rows, length, ·): its logits, or, with
    `head`, its final hidden states, to which the head is applied a tile at a time (`_STATS_TILE_ELEMENTS`) so that
    the batch's logits never exist at once. Only real positions are computed (pads keep log p 0, mu 0, sigma 1)."""
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].bool()
    rows, positions = targets.shape
    device = outputs.device.type
    vocab = outputs.shape[-1] if head is None else _head_rows(head)
    width = min(vocab, _STATS_VOCAB_TILE.get(device, _STATS_VOCAB_TILE["cuda"]))
    chunk = max(1, _STATS_TILE_ELEMENTS.get(device, _STATS_TILE_ELEMENTS["cuda"]) // width)
    logprob = torch.zeros((rows, positions), dtype=torch.float32, device=outputs.device)
    mu = torch.zeros_like(logprob)
    sigma = torch.ones_like(logprob)
    for row, real in enumerate(mask.sum(-1).tolist()):
        slices = _vocabulary_slices(outputs[row], head, vocab, width)
        for start in range(0, real, chunk):
            stop = min(real, start + chunk)
            values, mean, spread = distribution_stats(slices(start, stop), targets[row, start:stop], with_distribution)
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
    if isinstance(model, SequenceModel):
        return _score_texts_one_by_one(model, token_ids, zlib_lengths, with_extra, progress, desc)
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


def _score_texts_one_by_one(model: SequenceModel, token_ids: Sequence[Sequence[int]], zlib_lengths: Sequence[int],
                            with_extra: bool, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """`score_texts` of a model run outside torch, which gives the logits of one text at a time; the statistics are
    the same code."""
    columns: dict[str, np.ndarray] = {}
    for index in tqdm(range(len(token_ids)), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        input_ids = torch.tensor([list(token_ids[index])])
        stats = token_stats(model.logits(token_ids[index])[None], input_ids, torch.ones_like(input_ids),
                            with_distribution=with_extra)
        zl = torch.tensor([zlib_lengths[index]], dtype=torch.float64)
        for name, values in mia_scores(stats, zl, with_extra=with_extra).items():
            columns.setdefault(name, np.empty(len(token_ids), dtype=np.float64))[index] = float(values[0])
    return columns


@torch.inference_mode()
def answer_nll(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
               batch_size: int, prefix: SharedPrefix | None = None) -> np.ndarray:
    """Mean NLL per answer token of each answer given its prompt (teacher forcing: prompt ids + answer ids, as the
    model would have to generate them). The head is applied to the answer positions only, so no full-vocabulary
    logits exist for the prompts. With `prefix` (the few-shot block every KnowMem prompt starts with, as
    `generation.shared_prefix` finds it), only the tokens after it are run."""
    if isinstance(model, SequenceModel):
        return np.array([_answer_nll_one(model, prompt, answer) for prompt, answer in zip(prompts, answers)],
                        dtype=np.float64)
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


def _answer_nll_one(model: SequenceModel, prompt: Sequence[int], answer: Sequence[int]) -> float:
    logits = model.logits(list(prompt) + list(answer))[len(prompt) - 1:len(prompt) - 1 + len(answer)]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(list(answer)), reduction="mean"))
