"""MUSE's evaluation (VerbMem, KnowMem on forget and retain, PrivLeak) plus MIA AUCs, batched.

Definitions follow MUSE exactly (see paper.md, "MUSE metrics, exactly"); what differs is only how the work is
scheduled: prompts are generated in right-padded batches with a KV cache (a shared few-shot prefix computed once),
all privleak texts are scored in batched forward passes, and on CPU float32 linear layers run through oneDNN (gated
MLPs with their activation fused in: `models.onednn`) and long causal passes' attention as blocked oneDNN products
(`models.attention`); log-probabilities are taken in cache-sized tiles of the logits (`eval.logprobs`).
`benchmarks/bench_eval.py` checks the numbers against a one-prompt-at-a-time loop written like MUSE's.

One adaptation MUSE never needed: a prompt longer than the model's context minus the new tokens keeps its
last tokens (and its BOS), and a privleak text longer than the context keeps its first tokens. Both are
counted in `settings["truncated"]` and logged as warnings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import DataError, UserError
from qrunlearn.eval.bootstrap import auc_samples, mean_interval, percentile_interval
from qrunlearn.eval.config import METRIC_NAMES, EvalConfig, KnowMemPrompt
from qrunlearn.eval.generation import (
    context_length,
    encode,
    eos_token_ids,
    greedy_generate,
    input_device,
    pad_token_id,
    shared_prefix,
)
from qrunlearn.eval.logprobs import (
    MIN_K_RATIOS,
    PRIVLEAK_RATIO,
    answer_nll,
    min_k_name,
    score_texts,
    zlib_length,
)
from qrunlearn.eval.mia import muse_auc, privleak
from qrunlearn.eval.rouge import (
    contains_stop_string,
    cut_at_stop_strings,
    decode,
    rouge_l,
)
from qrunlearn.io import atomic_write_json, atomic_write_text, run_metadata
from qrunlearn.models.kernels import kernels

logger = logging.getLogger("qrunlearn.eval")

PRIVLEAK_SCORE = min_k_name(PRIVLEAK_RATIO)  # "min_k_40"
MIA_SCORES: tuple[str, ...] = ("loss", "zlib", *(min_k_name(r) for r in MIN_K_RATIOS), "min_k_pp")
_KNOWMEM_SPLIT = {"knowmem_f": "forget", "knowmem_r": "retain"}


@dataclass
class EvalResult:
    """`metrics`: every value (ROUGE metrics x100, AUCs in [0, 1], PrivLeak in %); `intervals`: 95% bootstrap
    intervals; `items`: per-item logs; `timings`: wall seconds per metric; `settings`: the resolved set-up."""

    metrics: dict[str, float | None]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "intervals": {k: [lo, hi] for k, (lo, hi) in self.intervals.items()},
            "timings": dict(self.timings),
            "settings": dict(self.settings),
        }


def check_corpus(corpus: MuseCorpus, metrics: tuple[str, ...]) -> None:
    """Raise `DataError` naming the first file a chosen metric needs and the corpus lacks."""
    for metric in metrics:
        if metric == "verbmem_f":
            corpus.require_verbmem()
        elif metric in _KNOWMEM_SPLIT:
            corpus.require_knowmem(f"{_KNOWMEM_SPLIT[metric]}_qa")
            corpus.require_knowmem(f"{_KNOWMEM_SPLIT[metric]}_qa_icl")
        elif metric == "privleak":
            corpus.require_privleak("forget")
            corpus.require_privleak("holdout")


def exact_match(items: list[dict[str, Any]], metric: str) -> float | None:
    """Share of a KnowMem metric's items whose (stop-string-cut) generation equals the answer exactly, ignoring
    surrounding whitespace; None when the items hold none of that metric."""
    rows = [item for item in items if item["metric"] == metric]
    if not rows:
        return None
    return sum(item["generation"].strip() == item["reference"].strip() for item in rows) / len(rows)


def _head(values: list, limit: int | None) -> list:
    return values if limit is None else values[:limit]


@dataclass(frozen=True)
class _Setup:
    """What every pass needs to know about the model and tokenizer."""

    context: int | None
    eos: tuple[int, ...]
    pad: int


def _setup(model, tokenizer, config: EvalConfig) -> _Setup:
    eos = eos_token_ids(model, tokenizer)
    return _Setup(context=context_length(model, config.max_context), eos=eos, pad=pad_token_id(tokenizer, eos))


def _prompt_budget(setup: _Setup, max_new_tokens: int) -> int | None:
    if setup.context is None:
        return None
    budget = setup.context - max_new_tokens
    if budget < 2:
        raise UserError(f"the model's context ({setup.context} positions) leaves no room for a prompt plus "
                        f"{max_new_tokens} new tokens")
    return budget


def _warn_truncated(what: str, count: int, total: int, limit: int | None) -> None:
    if count:
        logger.warning("%s: %d of %d texts exceed the model's context and were truncated to %s tokens",
                       what, count, total, limit)


def _generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, setup: _Setup, config: EvalConfig,
                    label: str, should_stop: Callable[[list[int]], bool] | None, progress: bool):
    """Tokenised prompts, their generations (decoded) with the number of new tokens of each, and the shared prefix
    the prompts were run with (None when not shared)."""
    budget = _prompt_budget(setup, max_new_tokens)
    encoded = encode(tokenizer, prompts, budget, keep="last")
    _warn_truncated(f"{label} prompts", encoded.n_truncated, len(prompts), budget)
    prefix = shared_prefix(model, encoded.ids) if config.share_prefix else None
    outputs = greedy_generate(model, encoded.ids, max_new_tokens, setup.pad, setup.eos, config.batch_size,
                              should_stop=should_stop, prefix=prefix, decode_threads=config.decode_threads,
                              progress=progress, desc=label)
    return encoded, decode(tokenizer, outputs), [len(tokens) for tokens in outputs], prefix


def run_verbmem(model, tokenizer, corpus: MuseCorpus, config: EvalConfig, setup: _Setup,
                progress: bool) -> tuple[list[float], list[float], list[dict[str, Any]], int]:
    """ROUGE-L F1 and recall (x100) per item, item logs, number of truncated prompts."""
    items = _head(corpus.require_verbmem(), config.limit)
    max_new = config.max_new_tokens_verbmem
    encoded, generations, new_tokens, _ = _generate_texts(model, tokenizer, [it.prompt for it in items], max_new,
                                                          setup, config, "verbmem_f", None, progress)
    gt_ids = tokenizer([it.gt for it in items], add_special_tokens=True)["input_ids"]
    references = decode(tokenizer, [list(ids[:max_new]) for ids in gt_ids])
    f1s, recalls, logs = [], [], []
    for index, (item, generation, reference) in enumerate(zip(items, generations, references)):
        score = rouge_l(reference, generation)
        f1s.append(score.f1 * 100)
        recalls.append(score.recall * 100)
        logs.append({"metric": "verbmem_f", "id": index, "prompt": item.prompt, "generation": generation,
                     "reference": reference, "score": score.f1 * 100, "recall": score.recall * 100,
                     "prompt_tokens": len(encoded.ids[index]), "new_tokens": new_tokens[index],
                     "truncated": encoded.truncated[index]})
    return f1s, recalls, logs, encoded.n_truncated


def knowmem_prompt(icl: list, question: str, style: KnowMemPrompt = "muse") -> str:
    """MUSE's few-shot format; with "answer-space" the final space is left for the answer (`EvalConfig`)."""
    shots = "".join(f"Question: {pair.question}\nAnswer: {pair.answer}\n\n" for pair in icl)
    prompt = shots + f"Question: {question}\nAnswer: "
    return prompt if style == "muse" else prompt[:-1]


def run_knowmem(model, tokenizer, corpus: MuseCorpus, split: str, config: EvalConfig, setup: _Setup,
                progress: bool) -> tuple[list[float], list[float], list[dict[str, Any]], int]:
    metric = f"knowmem_{split[0]}"
    qa = _head(corpus.require_knowmem(f"{split}_qa"), config.limit)
    icl = corpus.require_knowmem(f"{split}_qa_icl")
    prompts = [knowmem_prompt(icl, pair.question, config.knowmem_prompt) for pair in qa]

    def settled(tokens: list[int]) -> bool:
        # once a stop string has appeared, later tokens cannot change the cut text
        return contains_stop_string(decode(tokenizer, [tokens])[0])

    encoded, generations, new_tokens, prefix = _generate_texts(model, tokenizer, prompts, config.max_new_tokens_knowmem,
                                                               setup, config, metric, settled, progress)
    f1s, recalls, logs = [], [], []
    for index, (pair, prompt, raw) in enumerate(zip(qa, prompts, generations)):
        generation = cut_at_stop_strings(raw)
        score = rouge_l(pair.answer, generation)
        f1s.append(score.f1 * 100)
        recalls.append(score.recall * 100)
        logs.append({"metric": metric, "id": index, "question": pair.question, "prompt": prompt,
                     "generation": generation, "reference": pair.answer, "score": score.f1 * 100,
                     "recall": score.recall * 100, "prompt_tokens": len(encoded.ids[index]),
                     "new_tokens": new_tokens[index], "truncated": encoded.truncated[index]})
    if split == "forget" and config.answer_nll:
        answers = _answer_ids(tokenizer, qa, config)
        nlls = answer_nll(model, encoded.ids, answers, setup.pad, config.batch_size, prefix)
        for log, value, ids in zip(logs, nlls, answers):
            log["answer_nll"] = float(value)
            log["answer_tokens"] = len(ids)
    return f1s, recalls, logs, encoded.n_truncated


def _answer_ids(tokenizer, qa: list, config: EvalConfig) -> list[list[int]]:
    lead = "" if config.knowmem_prompt == "muse" else " "  # the answer carries the prompt's moved space
    return [list(ids) for ids in tokenizer([lead + pair.answer for pair in qa], add_special_tokens=False)["input_ids"]]


def forget_answer_tokens(model, tokenizer, corpus: MuseCorpus, config: EvalConfig
                         ) -> tuple[list[list[int]], list[list[int]], int]:
    """The KnowMem-forget prompts and answers exactly as `knowmem_f_answer_nll` scores them (token ids), and the
    pad id: the loss whose gradient `eval.gradient` takes."""
    setup = _setup(model, tokenizer, config)
    qa = _head(corpus.require_knowmem("forget_qa"), config.limit)
    icl = corpus.require_knowmem("forget_qa_icl")
    prompts = [knowmem_prompt(icl, pair.question, config.knowmem_prompt) for pair in qa]
    encoded = encode(tokenizer, prompts, _prompt_budget(setup, config.max_new_tokens_knowmem), keep="last")
    return encoded.ids, _answer_ids(tokenizer, qa, config), setup.pad


@dataclass
class PrivleakScores:
    """Per-split arrays of MIA scores (keys of `logprobs.mia_scores`) and the number of truncated texts."""

    scores: dict[str, dict[str, np.ndarray]]
    truncated: int
    logs: list[dict[str, Any]]


def run_privleak_scores(model, tokenizer, corpus: MuseCorpus, config: EvalConfig, setup: _Setup, with_extra: bool,
                        splits: tuple[str, ...], progress: bool) -> PrivleakScores:
    """Score every text of the given privleak splits in one batched pass."""
    texts: list[str] = []
    owners: list[tuple[str, int]] = []
    for split in splits:
        for index, text in enumerate(_head(corpus.require_privleak(split), config.limit)):
            texts.append(text)
            owners.append((split, index))
    encoded = encode(tokenizer, texts, setup.context, keep="first")
    _warn_truncated("privleak texts", encoded.n_truncated, len(texts), setup.context)
    for (split, index), ids in zip(owners, encoded.ids):
        if len(ids) < 2:
            raise DataError(corpus.root / "privleak" / f"{split}.json", "text has fewer than 2 tokens", index=index)
    # zlib is taken on the text actually scored: the whole text, or the decoded kept tokens when truncated
    zlib_lengths = [
        zlib_length(tokenizer.decode(ids, skip_special_tokens=True) if cut else text)
        for text, ids, cut in zip(texts, encoded.ids, encoded.truncated)
    ]
    columns = score_texts(model, encoded.ids, zlib_lengths, setup.pad, config.batch_size, with_extra=with_extra,
                          progress=progress, desc="privleak")
    scores: dict[str, dict[str, np.ndarray]] = {}
    logs: list[dict[str, Any]] = []
    for split in splits:
        rows = np.array([i for i, (owner, _) in enumerate(owners) if owner == split])
        scores[split] = {name: values[rows] for name, values in columns.items()}
    for row, (split, index) in enumerate(owners):
        logs.append({"metric": "privleak", "split": split, "id": index, "text_start": texts[row][:200],
                     "tokens": len(encoded.ids[row]), "truncated": encoded.truncated[row],
                     "nll_sum": float(columns["nll_sum"][row]), "scored_tokens": int(columns["n_tokens"][row]),
                     "scores": {name: float(values[row]) for name, values in columns.items()
                                if name not in ("nll_sum", "n_tokens")}})
    return PrivleakScores(scores=scores, truncated=encoded.n_truncated, logs=logs)


def privleak_auc(model, tokenizer, corpus: MuseCorpus, config: EvalConfig, progress: bool = False) -> float:
    """Min-40% AUC of privleak forget (label 0) vs holdout (label 1): a retrain model's reference AUC."""
    check_corpus(corpus, ("privleak",))
    setup = _setup(model, tokenizer, config)
    with kernels(model, config.cpu_kernels, inference=True):
        result = run_privleak_scores(model, tokenizer, corpus, config, setup, with_extra=False,
                                     splits=("forget", "holdout"), progress=progress)
    return muse_auc(result.scores["forget"][PRIVLEAK_SCORE], result.scores["holdout"][PRIVLEAK_SCORE])


def evaluate(model, tokenizer, corpus: MuseCorpus, config: EvalConfig, retrain_auc: float | None = None,
             progress: bool = True) -> EvalResult:
    """Run the chosen MUSE metrics on `model` (any torch causal LM, quantized or not). Without `retrain_auc`,
    `privleak` is None but `privleak_auc` and the MIA AUCs are still reported."""
    check_corpus(corpus, config.metrics)
    if retrain_auc is not None and not 0.0 < retrain_auc <= 1.0:
        raise UserError(f"retrain AUC must be in (0, 1], got {retrain_auc}")
    was_training = model.training
    model.eval()
    setup = _setup(model, tokenizer, config)
    result = EvalResult(metrics={})
    truncated: dict[str, int] = {}
    started = time.perf_counter()
    try:
        with kernels(model, config.cpu_kernels, inference=True) as paths:
            for metric in config.metrics:
                start = time.perf_counter()
                if metric == "privleak":
                    _add_privleak(result, model, tokenizer, corpus, config, setup, retrain_auc, truncated, progress)
                else:
                    _add_generation_metric(result, metric, model, tokenizer, corpus, config, setup, truncated,
                                           progress)
                result.timings[metric] = time.perf_counter() - start
    finally:
        model.train(was_training)
    result.timings["total"] = time.perf_counter() - started
    result.settings = {
        "config": config.model_dump(mode="json"),
        "retrain_auc": retrain_auc,
        "context_length": setup.context,
        "eos_token_ids": list(setup.eos),
        "pad_token_id": setup.pad,
        "device": str(input_device(model)),
        "onednn_linear": paths.onednn_linear,
        "fused_mlps": paths.fused_mlps,
        "blocked_attention": paths.blocked_attention,
        "truncated": truncated,
        "n_items": _count_items(result.items),
        "privleak_score": PRIVLEAK_SCORE,
        "auc_orientation": "roc_curve(y, -score) with privleak/forget labelled 0 and privleak/holdout 1 (MUSE)",
    }
    return result


def _add_generation_metric(result: EvalResult, metric: str, model, tokenizer, corpus: MuseCorpus, config: EvalConfig,
                           setup: _Setup, truncated: dict[str, int], progress: bool) -> None:
    """VerbMem or KnowMem: items, mean ROUGE-L F1 and recall with their intervals, and the answer NLL if logged."""
    if metric == "verbmem_f":
        f1s, recalls, logs, cut = run_verbmem(model, tokenizer, corpus, config, setup, progress)
    else:
        f1s, recalls, logs, cut = run_knowmem(model, tokenizer, corpus, _KNOWMEM_SPLIT[metric], config, setup,
                                              progress)
    truncated[metric] = cut
    result.items.extend(logs)
    if logs and "answer_nll" in logs[0]:
        result.metrics[f"{metric}_answer_nll"] = float(np.mean([log["answer_nll"] for log in logs]))
    for name, values in ((metric, f1s), (f"{metric}_recall", recalls)):
        result.metrics[name] = float(np.mean(values))
        result.intervals[name] = mean_interval(np.array(values), config.bootstrap, _stream(config.seed, name))


def _stream(seed: int, name: str) -> int:
    """A stable per-metric seed (Python's hash() of str is salted per process, so not that)."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


def _count_items(items: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        key = item["metric"] if item["metric"] != "privleak" else f"privleak_{item['split']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _add_privleak(result: EvalResult, model, tokenizer, corpus: MuseCorpus, config: EvalConfig, setup: _Setup,
                  retrain_auc: float | None, truncated: dict[str, int], progress: bool) -> None:
    splits = ("forget", "retain", "holdout") if "retain" in corpus.privleak else ("forget", "holdout")
    scored = run_privleak_scores(model, tokenizer, corpus, config, setup, with_extra=config.mia, splits=splits,
                                 progress=progress)
    truncated["privleak"] = scored.truncated
    result.items.extend(scored.logs)
    forget, holdout = scored.scores["forget"], scored.scores["holdout"]
    auc = muse_auc(forget[PRIVLEAK_SCORE], holdout[PRIVLEAK_SCORE])
    result.metrics["privleak_auc"] = auc
    samples = auc_samples(forget[PRIVLEAK_SCORE], holdout[PRIVLEAK_SCORE], config.bootstrap,
                          _stream(config.seed, "privleak"))
    result.intervals["privleak_auc"] = percentile_interval(samples)
    result.metrics["privleak"] = privleak(auc, retrain_auc) if retrain_auc is not None else None
    if retrain_auc is not None:
        result.intervals["privleak"] = percentile_interval(privleak(samples, retrain_auc))
    if config.mia:
        for name in MIA_SCORES:
            result.metrics[f"mia_{name}"] = muse_auc(forget[name], holdout[name])
    # mean per-token NLL, pooled over the split's tokens: where quantization effects show at small scale
    for split in splits:
        values = scored.scores[split]
        result.metrics[f"nll_privleak_{split}"] = float(values["nll_sum"].sum() / values["n_tokens"].sum())


def write_eval_outputs(result: EvalResult, out_json: Path | str, model_path: Path | str | None = None,
                       quant_spec: Any = None, data_path: Path | str | None = None,
                       retrain: str | None = None) -> tuple[Path, Path]:
    """Write `out_json` (headline metrics at the top level, then all metrics, intervals, timings, settings and
    provenance) and `<stem>.items.jsonl` (one per-item log per line), each atomically; returns both paths."""
    out_json = Path(out_json)
    items_path = out_json.with_name(f"{out_json.stem}.items.jsonl")
    lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in result.items)
    atomic_write_text(items_path, lines)
    headline = {key: result.metrics.get(key) for key in (*METRIC_NAMES, "privleak_auc") if key in result.metrics}
    payload = {
        **headline,
        **result.to_dict(),
        "model_path": str(model_path) if model_path is not None else None,
        "quant_spec": quant_spec,
        "data_path": str(data_path) if data_path is not None else None,
        "retrain": retrain,
        "items_file": items_path.name,
        "meta": run_metadata(config=result.settings.get("config"), seed=result.settings.get("config", {}).get("seed")),
    }
    atomic_write_json(out_json, payload)
    return out_json, items_path
