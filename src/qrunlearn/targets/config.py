"""Settings of the target builders that other settings embed (kept free of heavy imports: the experiment config
and the command line read them at start-up)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from qrunlearn.eval.config import KnowMemPrompt


class FinetuneRecipe(BaseModel):
    """How a pretrained base is fine-tuned into the target (defaults sized for SmolLM2-135M on the built-in
    benchmark; see benchmarks/RESULTS.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(5e-5, gt=0, description="AdamW learning rate after warmup (constant)")
    max_epochs: int = Field(12, ge=1, description="epoch cap for the target")
    threshold: float = Field(0.9, ge=0, le=1, description="stop the target once its KnowMem-forget exact match "
                                                          "reaches this")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step")
    max_length: int = Field(256, ge=2, description="tokens per training window")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the epoch-cap steps spent warming up")
    grad_clip: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    eval_batch_size: int = Field(32, ge=1, description="KnowMem prompts per batch in the per-epoch check")


class BaseTargetConfig(FinetuneRecipe):
    """A pretrained causal LM fine-tuned into the target and the retrain model."""

    base: str = Field(description="the pretrained model: a HF folder, a hub id or a .gguf file")
    seed: int = 0
    knowmem_prompt: KnowMemPrompt = Field("muse", description="KnowMem prompt of the per-epoch check (an experiment "
                                                              "passes its eval.knowmem_prompt)")
