"""Counts and length statistics of a corpus, for `qrunlearn data check`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qrunlearn.data.muse import MuseCorpus


@dataclass(frozen=True)
class LengthStats:
    name: str
    count: int
    chars_mean: float
    chars_min: int
    chars_max: int
    tokens_mean: float | None = None
    tokens_max: int | None = None


def _texts(corpus: MuseCorpus) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {f"raw/{k}": v for k, v in corpus.raw.items()}
    if corpus.verbmem is not None:
        texts["verbmem/forget (prompt)"] = [v.prompt for v in corpus.verbmem]
        texts["verbmem/forget (gt)"] = [v.gt for v in corpus.verbmem]
    for name, pairs in corpus.knowmem.items():
        texts[f"knowmem/{name} (question)"] = [p.question for p in pairs]
        texts[f"knowmem/{name} (answer)"] = [p.answer for p in pairs]
    texts.update({f"privleak/{k}": v for k, v in corpus.privleak.items()})
    texts.update(corpus.extra)
    return texts


def corpus_stats(corpus: MuseCorpus, tokenizer=None) -> list[LengthStats]:
    rows = []
    for name, items in _texts(corpus).items():
        chars = [len(t) for t in items]
        tokens_mean = tokens_max = None
        if tokenizer is not None:
            lengths = [len(ids) for ids in tokenizer(items, add_special_tokens=False)["input_ids"]]
            tokens_mean, tokens_max = statistics.fmean(lengths), max(lengths)
        rows.append(LengthStats(name, len(items), statistics.fmean(chars), min(chars), max(chars),
                                tokens_mean, tokens_max))
    return rows


def format_stats(rows: list[LengthStats]) -> str:
    with_tokens = any(r.tokens_mean is not None for r in rows)
    header = f"{'file':<34} {'items':>6} {'chars mean':>11} {'min':>7} {'max':>7}"
    if with_tokens:
        header += f" {'tokens mean':>12} {'max':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r.name:<34} {r.count:>6} {r.chars_mean:>11.1f} {r.chars_min:>7} {r.chars_max:>7}"
        if with_tokens and r.tokens_mean is not None:
            line += f" {r.tokens_mean:>12.1f} {r.tokens_max:>7}"
        lines.append(line)
    return "\n".join(lines)
