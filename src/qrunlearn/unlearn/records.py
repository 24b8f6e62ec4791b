"""Typed records of an unlearning run: per-step losses, per-epoch summaries, resume progress, the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qrunlearn.unlearn.config import UnlearnConfig


class StepLoss(BaseModel):
    """One optimizer step: the global-batch forget and retain terms and the combined loss."""

    epoch: int
    step: int
    forget: float
    retain: float
    loss: float
    log_ratio: float | None = None  # NPO: mean log(pi_theta(x) / pi_ref(x)) over the forget sequences (0 at step 0)
    quail: float | None = None  # QUAIL's hinge term (0 once every forget position is a margin away)


class EpochRecord(BaseModel):
    """One finished epoch: its mean losses and what the epoch hook measured (e.g. {"knowmem_f": 12.4})."""

    epoch: int
    forget: float
    retain: float
    metrics: dict[str, float] = Field(default_factory=dict)


class Progress(BaseModel):
    """Where a run stands after its last finished epoch; saved with every checkpoint so a resume continues it."""

    fingerprint: str
    quail_margin: float | None = None
    epochs_done: int = 0
    losses: list[StepLoss] = Field(default_factory=list)
    epochs: list[EpochRecord] = Field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    selected_epoch: int | None = None
    stopped_reason: str = "completed"
    resumed_after: list[int] = Field(default_factory=list)  # epochs done at each resume from a checkpoint


class RunRecord(BaseModel):
    """`unlearn.json`: the settings, the run's progress and its provenance. Written with "running" after each
    epoch and with "finished" last, so a folder whose record says finished is finished."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["running", "finished"]
    config: UnlearnConfig
    source_model: str
    lora_targets: list[str] | None
    forget_chunks: int
    retain_chunks: int
    num_processes: int
    mixed_precision: str
    progress: Progress
    tokens_per_second: float
    provenance: dict[str, Any]


class UnlearnResult(BaseModel):
    """Where an unlearning run's outputs are and how it went."""

    model_dir: Path
    adapter_dir: Path | None
    losses: list[StepLoss]
    epochs: list[EpochRecord]
    epochs_run: int
    stopped_reason: str  # "completed" | "selected: ..." | "non-finite loss: ..."
    selected_epoch: int | None = None
    seconds: float = 0.0
    tokens: int = 0
    reused: bool = False  # True when an already finished run in the output folder was returned

    @classmethod
    def from_progress(cls, out_dir: Path, progress: Progress, adapter_dir: Path | None,
                      reused: bool = False) -> "UnlearnResult":
        return cls(model_dir=out_dir / "model", adapter_dir=adapter_dir, losses=progress.losses,
                   epochs=progress.epochs, epochs_run=progress.epochs_done, stopped_reason=progress.stopped_reason,
                   selected_epoch=progress.selected_epoch, seconds=progress.seconds, tokens=progress.tokens,
                   reused=reused)
