"""ROUGE-L as MUSE scores it, and the stop-string cut that KnowMem applies to generations.

MUSE uses the `rouge-score` package without a stemmer and calls `scorer.score(reference, generation)`:
precision is measured on the generation, recall on the reference. Its tokenizer lower-cases and splits on
non-alphanumerics, so punctuation and case never count. That path is ~20 lines (the tokenizer, the longest common
subsequence, the F-measure), written here with the package's own arithmetic so the scores are the same floats
(tests compare with `rouge-score` itself): importing the package pulls in nltk and scikit-learn (4 s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KNOWMEM_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class RougeL:
    """ROUGE-L of one (reference, generation) pair, each in [0, 1]."""

    f1: float
    precision: float
    recall: float


_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without a stemmer: lower-case, non-alphanumerics to spaces, split, keep tokens."""
    return [token for token in _SPACES.split(_NON_ALPHANUMERIC.sub(" ", text.lower())) if _TOKEN.match(token)]


def lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence (the dynamic programme, one row at a time)."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for j, other in enumerate(second, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, generation: str) -> RougeL:
    reference_tokens, generation_tokens = rouge_tokens(reference), rouge_tokens(generation)
    if not reference_tokens or not generation_tokens:
        return RougeL(f1=0.0, precision=0.0, recall=0.0)
    common = lcs_length(reference_tokens, generation_tokens)
    precision = common / len(generation_tokens)
    recall = common / len(reference_tokens)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return RougeL(f1=f1, precision=precision, recall=recall)


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
