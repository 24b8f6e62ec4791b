"""MUSE's model selection: the reported checkpoint is the first epoch whose KnowMem-forget is at most the
retrain model's."""

from __future__ import annotations

from collections.abc import Sequence

from qrunlearn.unlearn.records import EpochRecord


def select_epoch(epochs: Sequence[EpochRecord], retrain_knowmem_f: float, key: str = "knowmem_f") -> int | None:
    """The first epoch whose metric `key` <= `retrain_knowmem_f`; None when no epoch qualifies (or none has the
    metric). `epochs` in training order."""
    for record in epochs:
        value = record.metrics.get(key)
        if value is not None and value <= retrain_knowmem_f:
            return record.epoch
    return None
