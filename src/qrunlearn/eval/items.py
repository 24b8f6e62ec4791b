"""Per-item scores of one evaluation, kept with its results so that two evaluations can be compared item by item.

Items are stored in corpus order: two evaluations of the same corpus with the same `limit` hold the same question,
prompt or text at the same index, which is what makes a bootstrap over items *paired* (`eval.effect`). The
per-item logs (`<name>.items.jsonl` of `qrunlearn eval`) carry the same numbers with the texts; these are only the
numbers, rounded to 6 decimals (a few kB per evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

# Groups of items that a bootstrap resamples together: the forget answers' NLL belongs to the KnowMem-forget
# questions, the forget NLL and the AUC's first split to the privleak/forget texts.
ItemFamily = Literal["verbmem", "knowmem_f", "knowmem_r", "privleak_forget", "privleak_holdout"]
DIGITS = 6


class ItemScores(BaseModel):
    """The numbers behind each metric, one per item (None where the metric was not evaluated)."""

    model_config = ConfigDict(frozen=True)

    verbmem_f: list[float] | None = None  # ROUGE-L F1 x 100 per VerbMem prompt
    knowmem_f: list[float] | None = None  # ROUGE-L F1 x 100 per forget question
    knowmem_f_answer_nll: list[float] | None = None  # mean NLL per token of each forget answer
    knowmem_r: list[float] | None = None  # ROUGE-L F1 x 100 per retain question
    privleak_forget: list[float] | None = None  # Min-40% score of each privleak/forget text (the AUC's input)
    privleak_holdout: list[float] | None = None
    forget_nll_sum: list[float] | None = None  # summed token NLL of each privleak/forget text
    forget_tokens: list[int] | None = None  # its scored tokens (the forget NLL pools sum / tokens)

    def family_size(self, family: ItemFamily) -> int | None:
        values = {"verbmem": self.verbmem_f, "knowmem_f": self.knowmem_f, "knowmem_r": self.knowmem_r,
                  "privleak_forget": self.privleak_forget, "privleak_holdout": self.privleak_holdout}[family]
        return None if values is None else len(values)


def rounded(values: Sequence[float] | np.ndarray) -> list[float]:
    return [round(float(v), DIGITS) for v in values]


def item_scores(items: list[dict[str, Any]], privleak_score: str) -> ItemScores:
    """Collect the per-item numbers from an evaluation's item logs (`EvalResult.items`)."""

    def column(metric: str, key: str = "score") -> list[float] | None:
        rows = [item for item in items if item["metric"] == metric]
        if not rows or key not in rows[0]:
            return None
        return rounded([item[key] for item in sorted(rows, key=lambda item: item["id"])])

    def privleak(split: str, key: str) -> list[float] | None:
        rows = sorted((item for item in items if item["metric"] == "privleak" and item["split"] == split),
                      key=lambda item: item["id"])
        if not rows:
            return None
        return rounded([item["scores"][key] if key in item["scores"] else item[key] for item in rows])

    tokens = privleak("forget", "scored_tokens")
    return ItemScores(verbmem_f=column("verbmem_f"), knowmem_f=column("knowmem_f"),
                      knowmem_f_answer_nll=column("knowmem_f", "answer_nll"), knowmem_r=column("knowmem_r"),
                      privleak_forget=privleak("forget", privleak_score),
                      privleak_holdout=privleak("holdout", privleak_score),
                      forget_nll_sum=privleak("forget", "nll_sum"),
                      forget_tokens=None if tokens is None else [int(t) for t in tokens])
