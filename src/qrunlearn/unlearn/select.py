"""MUSE's model selection: the reported checkpoint is the first epoch whose KnowMem-forget is at most the
retrain model's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def select_epoch(epoch_metrics: Sequence[Mapping[str, Any]], retrain_knowmem_f: float,
                 key: str = "knowmem_forget") -> int | None:
    """The first row's "epoch" whose `key` <= `retrain_knowmem_f`; None when no epoch qualifies (or none has
    the metric). Rows are per-epoch dicts with an "epoch" field, in training order."""
    for row in epoch_metrics:
        value = row.get(key)
        if value is not None and float(value) <= retrain_knowmem_f:
            return int(row["epoch"])
    return None
