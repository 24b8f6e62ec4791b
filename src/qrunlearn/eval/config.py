"""What an evaluation computes and how: one record, used by the `eval` command's options and by an
experiment's `eval:` section alike."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MetricName = Literal["verbmem_f", "knowmem_f", "knowmem_r", "privleak"]
METRIC_NAMES: tuple[MetricName, ...] = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
# MUSE's published retrain AUCs (Min-40% Prob, privleak/forget vs privleak/holdout)
RETRAIN_AUC_PRESETS: dict[str, float] = {"news": 0.4772, "books": 0.5393}


class EvalConfig(BaseModel):
    """What to evaluate and how. One definition: the `eval` command's options and an experiment's `eval:`
    section are both this record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: tuple[MetricName, ...] = Field(METRIC_NAMES, min_length=1, description="MUSE metrics to compute")
    limit: int | None = Field(None, ge=1, description="use only the first N items of each evaluated file (the "
                                                     "few-shot examples are always all used)")
    batch_size: int = Field(16, ge=1, description="prompts (or texts) per batch")
    max_new_tokens_verbmem: int = Field(128, ge=1, description="MUSE: 128; also the ground-truth tokens kept")
    max_new_tokens_knowmem: int = Field(32, ge=1, description="MUSE: 32")
    bootstrap: int = Field(1000, ge=1, description="bootstrap resamples for the 95% intervals")
    seed: int = Field(0, description="bootstrap seed")
    mia: bool = Field(True, description="also the LOSS / zlib / Min-K / Min-K++ AUCs (same forward passes)")
    max_context: int | None = Field(None, ge=2, description="override the model config's max_position_embeddings")
    answer_nll: bool = Field(True, description="with knowmem_f: also the mean NLL of each forget answer given its "
                                               "few-shot prompt (knowmem_f_answer_nll)")
    share_prefix: bool = Field(True, description="compute a prompt prefix common to all items (the few-shot "
                                                 "block) once")
