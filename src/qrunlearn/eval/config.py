"""What an evaluation computes and how: one record, used by the `eval` command's options and by an
experiment's `eval:` section alike."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qrunlearn.models.kernels import CpuKernels

MetricName = Literal["verbmem_f", "knowmem_f", "knowmem_r", "privleak"]
# "muse": MUSE's prompt, ending in "Answer: ". "answer-space": the same text with that last space moved from the
# prompt to the answer. A BPE tokenizer (GPT-2 style: SmolLM2, Llama-3) makes the prompt's trailing space a lone token
# that in training text never comes before an answer (there the space is part of the answer's first token), so a
# small fine-tuned model that knows the answer still fails to produce it (measured on SmolLM2-135M: KnowMem exact
# match 0.15 with "muse", 0.45 with "answer-space", same model). ROUGE ignores the space, so scores stay comparable.
KnowMemPrompt = Literal["muse", "answer-space"]
METRIC_NAMES: tuple[MetricName, ...] = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
# MUSE's published retrain AUCs (Min-40% Prob, privleak/forget vs privleak/holdout)
RETRAIN_AUC_PRESETS: dict[str, float] = {"news": 0.4772, "books": 0.5393}


# Decoding steps run on one CPU thread by default. A step is memory-bound work split into ~250 small parallel regions
# (each matmul, each attention); when the cores are shared with other processes every region waits for a descheduled
# thread. Measured on 2 shared cores (load ~5), SmolLM2, 8 rows: 0.4-5.5 s per step with 2 threads, 0.12 s with 1.
# On an idle machine with many cores, more threads may decode faster (not measured here): set it to None there.


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
    knowmem_prompt: KnowMemPrompt = Field("muse", description="'muse' = MUSE's prompt exactly; 'answer-space' = the "
                                                              "prompt's final space moved to the answer (for BPE "
                                                              "tokenizers that split it off; see eval.config)")
    answer_nll: bool = Field(True, description="with knowmem_f: also the mean NLL of each forget answer given its "
                                               "few-shot prompt (knowmem_f_answer_nll)")
    share_prefix: bool = Field(True, description="compute a prompt prefix common to all items (the few-shot "
                                                 "block) once")
    decode_threads: int | None = Field(1, ge=1, description="CPU threads of the single-token decoding steps (None = "
                                                            "torch's setting); see the comment above")
    cpu_kernels: CpuKernels = True

    @model_validator(mode="before")
    @classmethod
    def _one_kernel_switch(cls, raw: Any) -> Any:
        """Records written when each kernel had its own switch (`onednn_linear`, `blocked_attention`) still read."""
        if isinstance(raw, dict) and {"onednn_linear", "blocked_attention"} & raw.keys():
            raw = dict(raw)
            old = [bool(raw.pop(name)) for name in ("onednn_linear", "blocked_attention") if name in raw]
            raw.setdefault("cpu_kernels", all(old))
        return raw
