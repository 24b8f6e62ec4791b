"""ROUGE-L as MUSE scores it, and the stop-string cut that KnowMem applies to generations.

MUSE uses the `rouge-score` package without a stemmer and calls `scorer.score(reference, generation)`:
precision is measured on the generation, recall on the reference. The default tokenizer lower-cases and
splits on non-alphanumerics, so punctuation and case never count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rouge_score import rouge_scorer

KNOWMEM_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class RougeL:
    """ROUGE-L of one (reference, generation) pair, each in [0, 1]."""

    f1: float
    precision: float
    recall: float


@lru_cache(maxsize=1)
def _scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, generation: str) -> RougeL:
    score = _scorer().score(reference, generation)["rougeL"]
    return RougeL(f1=score.fmeasure, precision=score.precision, recall=score.recall)


# transformers 4's `clean_up_tokenization`, which MUSE turns on when decoding (clean_up_tokenization_spaces=True).
# transformers 5 ignores that flag for BPE tokenizers, so it is applied here by hand to stay version-independent.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def decode(tokenizer, sequences: list[list[int]]) -> list[str]:
    """Decode as MUSE does: skip special tokens, then clean up tokenization spaces."""
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [clean_up_tokenization(text) for text in texts]


def cut_at_stop_strings(text: str, stops: tuple[str, ...] = KNOWMEM_STOP_STRINGS) -> str:
    """The text before the earliest occurrence of any stop string (MUSE splits on each in turn and keeps
    the head, which is the same thing)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def contains_stop_string(text: str, stops: tuple[str, ...] = KNOWMEM_STOP_STRINGS) -> bool:
    return any(stop in text for stop in stops)
