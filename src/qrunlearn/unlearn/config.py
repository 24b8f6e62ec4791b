"""Settings of one unlearning run, with the paper's defaults and the built-in tiny model's defaults.

Every default lives here, visible in one place. `UnlearnConfig` is a pydantic model, so it validates its
fields, serialises to JSON (it is written into every output folder) and can be rebuilt from that JSON.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qrunlearn.models.kernels import CpuKernels
from qrunlearn.unlearn.strategy import STRATEGY_HELP, Adapter, DefaultsName, Strategy

Method = Literal["ga", "npo", "simnpo", "wga", "satimp", "undial", "idkdpo", "rmu"]
METHODS: tuple[Method, ...] = get_args(Method)
METHOD_HELP = ("ga (gradient ascent), npo, simnpo, wga (weighted GA), satimp (saturation-importance weighted GA), "
               "undial (self-distillation, adjusted logits), idkdpo (DPO toward 'I don't know'; needs the corpus's "
               "forget QA), rmu (steer one layer's hidden states to a random direction)")
# act: RMU's own retain term, the hidden states at its layer kept at the frozen model's.
Reg = Literal["none", "gdr", "klr", "act"]
REGS: tuple[Reg, ...] = get_args(Reg)
REG_HELP = ("none, gdr (retain NLL), klr (KL to the reference), act (RMU only: its layer's hidden states as the "
            "reference's)")
SaveDType = Literal["source", "float32", "bfloat16"]
TrainDType = Literal["auto", "float32", "bfloat16"]
# Before strategies were typed, their settings were fields of their own; records written then still read.
LEGACY_STRATEGY_FIELDS = ("sure_percentile", "quail_weight", "quail_spec", "quail_margin", "qat", "qat_mix")


def rename_older_kernel_switch(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of older settings with `onednn_linear`, the kernels' switch before it was one for every stage, read as
    `cpu_kernels`."""
    raw = dict(raw)
    if "onednn_linear" in raw:
        raw.setdefault("cpu_kernels", raw.pop("onednn_linear"))
    return raw

# Retain weights alpha from the seed code's MUSE scripts (paper.md): GA 100, NPO 0.1. SimNPO is not in that
# table; MUSE's own baselines use 1, so SimNPO gets 1.
# The new methods' from open-unlearning's configs (configs/trainer/*.yaml at d3d7cf9): WGA, IdkDPO (DPO.yaml), UNDIAL
# (GradDiff's 1: its yaml's 0 means no retain term, which `reg: none` says here) and RMU 1; SatImp 0.1, its README's
# forget:retain ratio of 10 (its yaml swaps gamma and alpha). RMU with its own retain term (act): WMDP's Zephyr-7B 1200.
PAPER_ALPHA: dict[Method, float] = {"ga": 100.0, "npo": 0.1, "simnpo": 1.0, "wga": 1.0, "satimp": 0.1, "undial": 1.0,
                                    "idkdpo": 1.0, "rmu": 1.0}
PAPER_RMU_ACT_ALPHA = 1200.0
PAPER_LR: dict[Adapter, float] = {"full": 1e-5, "lora": 1e-4}
# (batch per device, grad accum) on one device: full FT effective batch 16; LoRA batch 4 x grad-accum 8.
PAPER_BATCH: dict[Adapter, tuple[int, int]] = {"full": (4, 4), "lora": (4, 8)}
# 512 positions x 32k vocabulary x 4 sequences = 64M fp32 logits (256 MB) at once instead of 1 GB per copy.
PAPER_LOSS_CHUNK = 512

# Built-in tiny model (PRESETS["small"], ~4.3M params, memorised forget + retain1): chosen by measurement with
# benchmarks/sweep_unlearn_tiny.py, KnowMem after every epoch (the sweep's table: benchmarks/RESULTS.md, "Tiny
# defaults"). GA stops one epoch before it wrecks retain (full 4, LoRA 3), NPO runs 5; LoRA needs 5-10x full FT's lr.
TINY_LR: dict[tuple[Method, Adapter], float] = {
    ("ga", "full"): 3e-4, ("ga", "lora"): 3e-3, ("npo", "full"): 1e-3, ("npo", "lora"): 5e-3,
    ("simnpo", "full"): 1e-3, ("simnpo", "lora"): 5e-3,  # not swept: NPO's
    # issue 24's methods, by the same sweep (KnowMem-f / KnowMem-r after 5 epochs, target ~90 / ~88, retrain 3.6 /
    # 61.4): the lr whose forgetting is deepest with KnowMem-r >= 75 (RESULTS.md, "The field's other methods")
    ("wga", "full"): 1e-3, ("wga", "lora"): 5e-3, ("satimp", "full"): 3e-3, ("satimp", "lora"): 1.5e-2,
    ("undial", "full"): 3e-3, ("undial", "lora"): 5e-3, ("idkdpo", "full"): 3e-3, ("idkdpo", "lora"): 1e-2,
    ("rmu", "full"): 3e-3, ("rmu", "lora"): 3e-3,
}
TINY_EPOCHS: dict[tuple[Method, Adapter], int] = {
    (method, adapter): 4 if (method, adapter) == ("ga", "full") else 3 if (method, adapter) == ("ga", "lora") else 5
    for method in METHODS for adapter in ("full", "lora")
}
TINY_ALPHA: dict[Method, float] = {"ga": 5.0, "npo": 1.0, "simnpo": 1.0, "wga": 1.0, "satimp": 1.0, "undial": 1.0,
                                   "idkdpo": 1.0, "rmu": 1.0}
# RMU on the tiny model (mean hidden-state norm 15.9 at its layer 1): c = 20 forgot to KnowMem-f 7.2 (full) / 1.4
# (LoRA) at KnowMem-r 84-86; WMDP's 6.5 left 33.9 (full); 60 wrecked retain (46, LoRA 0).
TINY_RMU_COEFFICIENT = 20.0
TINY_BATCH = 8
TINY_MAX_LENGTH = 256


# The settings a grid may override per cell and the CLI exposes as options; `config.UnlearnOverrides` and the
# `unlearn` command's options are generated from these fields, so each is declared once, here.
TUNABLE: tuple[str, ...] = (
    "lr", "epochs", "batch_size", "grad_accum", "max_length", "alpha", "gamma", "beta", "delta", "weight_decay",
    "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "dtype", "precision",
    "gradient_checkpointing", "loss_chunk", "sharding", "reference_device", "cpu_kernels", "pass_cost_tokens",
    "wga_power", "saturation_power", "importance_power", "undial_strength", "rmu_layer", "rmu_coefficient",
    "rmu_params",
)


class UnlearnConfig(BaseModel):
    """One unlearning run. loss = gamma * forget_loss(method) + alpha * retain_loss(reg)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field("ga", description="forget objective: " + METHOD_HELP)
    reg: Reg = Field("gdr", description="retain term: " + REG_HELP)
    strategy: Strategy = Field(Strategy(), description="which weights move (full, lora) and SURE / QUAIL / "
                                                       "quantization-aware unlearning on top: " + STRATEGY_HELP)
    lr: float = Field(1e-5, gt=0, description="learning rate (AdamW, constant schedule); SURE multiplies it by its "
                                              "lr_factor")
    epochs: int = Field(5, ge=1, description="passes over the forget set")
    batch_size: int = Field(4, ge=1, description="sequences per device per micro-batch (forget; retain the same)")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(2048, ge=2, description="tokens per chunk, BOS included (MUSE: 2048)")
    alpha: float = Field(1.0, ge=0, description="retain weight")
    gamma: float = Field(1.0, ge=0, description="forget weight")
    beta: float = Field(0.1, gt=0, description="NPO / SimNPO / IdkDPO inverse temperature")
    delta: float = Field(0.0, description="SimNPO margin")
    wga_power: float = Field(1.0, ge=0, description="WGA: each token's weight is its probability to this power "
                                                    "(open-unlearning's beta)")
    saturation_power: float = Field(5.0, ge=0, description="SatImp: exponent of p in the weight p^s (1-p)^i "
                                                           "(open-unlearning's beta1)")
    importance_power: float = Field(1.0, ge=0, description="SatImp: exponent of 1-p in the weight (beta2)")
    undial_strength: float = Field(10.0, ge=0, description="UNDIAL: how far the true token's reference logit is "
                                                           "lowered in the distillation target (open-unlearning's "
                                                           "beta; its paper tries 3-30)")
    rmu_layer: Optional[int] = Field(None, ge=0, description="RMU: the block whose output is steered (0-based); "
                                                             "None = 7/32 of the depth, WMDP's layer 7 of 32")
    rmu_coefficient: float = Field(6.5, gt=0, description="RMU: length c of the random target direction (WMDP's "
                                                          "Zephyr-7B value; scale it with the model's hidden states)")
    rmu_params: Literal["paper", "all"] = Field(
        "paper", description="RMU with full fine-tuning: paper = the MLP down-projections of the blocks layer-2 .. "
                             "layer (WMDP's), all = every weight (open-unlearning's default); LoRA trains its adapters")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off); 1.0 is HF Trainer's "
                                                        "default, which MUSE's and the seed's code inherit")
    lora_r: int = Field(32, ge=1, description="LoRA rank")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_targets: Optional[list[str]] = Field(None, description="module names; None = every linear layer "
                                                                "except the output head")
    seed: int = Field(0, description="seed of the data order, LoRA initialisation and dropout")
    save_every_epoch: bool = Field(False, description="also write epochs/epoch_NNN/ model folders")
    forget_split: str = Field("forget", description="raw split to forget")
    retain_split: str = Field("retain1", description="raw split to retain")
    save_dtype: SaveDType = Field("source", description="dtype of saved weights; 'source' = the input model's")
    dtype: TrainDType = Field("auto", description="compute dtype: auto = bf16 on CUDA, fp32 on CPU")
    precision: Literal["mixed", "pure"] = Field(
        "mixed", description="with bf16: mixed = fp32 master weights and optimizer state, bf16 compute; pure = "
                             "weights, gradients and optimizer state in bf16 (the paper's seed code)")
    gradient_checkpointing: bool = Field(False, description="recompute each block's activations in the backward pass "
                                                            "instead of storing them")
    loss_chunk: int = Field(0, ge=0, description="positions whose logits are formed at once for the losses (0 = the "
                                                 "whole batch); bounds the memory of large-vocabulary logits")
    sharding: Literal["none", "fsdp"] = Field("none", description="none = one process or DDP; fsdp = FSDP2 over "
                                                                  "the processes of `accelerate launch`")
    cpu_kernels: CpuKernels = True
    pass_cost_tokens: Optional[int] = Field(
        None, ge=0, description="group each micro-batch's chunks by length into separate forward passes, each charged "
                                "this many tokens of fixed cost against the padding it saves (0 = no padding at "
                                "all, a large value = one padded pass); None = by device (CPU 64, CUDA 4096). The "
                                "loss is the same sum: results differ in the last bits. Not with sharding 'fsdp'")
    reference_device: Literal["auto", "cpu"] = Field(
        "auto", description="where full fine-tuning's frozen reference (KLR, QUAIL) lives: beside the policy, or on "
                            "the CPU")
    stop_knowmem_f: Optional[float] = Field(
        None, description="MUSE selection: stop at the first epoch whose hook metric 'knowmem_f' is <= this "
                          "(the retrain model's KnowMem-forget); needs an epoch_hook")

    @model_validator(mode="before")
    @classmethod
    def _older_fields(cls, raw: Any) -> Any:
        """`adapter=` is the strategy's adapter (`UnlearnConfig(adapter="lora")` reads as the strategy "lora"). Records
        from before still read: their flat strategy fields become the strategy they meant (their `lr` already held
        SURE's factor, so it is kept as 1), and `onednn_linear` is `cpu_kernels`."""
        if not isinstance(raw, dict) or not ({"adapter", "onednn_linear", *LEGACY_STRATEGY_FIELDS} & raw.keys()):
            return raw
        raw = rename_older_kernel_switch(raw)
        if not ({"adapter", *LEGACY_STRATEGY_FIELDS} & raw.keys()):
            return raw
        strategy = raw.get("strategy")
        fields: dict[str, Any] = dict(strategy) if isinstance(strategy, dict) else {}
        if strategy is not None and not isinstance(strategy, dict):
            parsed = Strategy.parse(strategy)
            fields = {name: getattr(parsed, name) for name in Strategy.model_fields}
        if "adapter" in raw:
            adapter = raw.pop("adapter")
            if strategy is not None and fields.get("adapter", adapter) != adapter:
                raise ValueError(f"adapter '{adapter}' contradicts strategy '{strategy}'")
            fields["adapter"] = adapter
        flat = {name: raw.pop(name) for name in LEGACY_STRATEGY_FIELDS if name in raw}
        if flat.get("sure_percentile") is not None:
            fields["sure"] = {"percentile": flat["sure_percentile"], "lr_factor": 1.0}
        if (flat.get("quail_weight") or 0) > 0:
            fields["quail"] = {"weight": flat["quail_weight"], "spec": flat.get("quail_spec", "nf4"),
                               "margin": flat.get("quail_margin", "logit")}
        if flat.get("qat"):
            fields["qat"] = {"spec": flat["qat"], "mix": flat.get("qat_mix", 1.0)}
        raw["strategy"] = fields
        return raw

    @model_validator(mode="after")
    def _compatible(self) -> "UnlearnConfig":
        if self.reg == "act" and self.method != "rmu":
            raise ValueError(f"reg 'act' is RMU's retain term (its layer's hidden states): not with method "
                             f"'{self.method}'")
        if self.method == "undial" and self.loss_chunk:
            raise ValueError("method undial distils whole next-token distributions: use loss_chunk 0")
        if self.strategy.sure is not None and self.sharding == "fsdp":
            raise ValueError("strategy: SURE needs whole weight rows: not with sharding 'fsdp'")
        if self.strategy.quail is not None and self.loss_chunk:
            raise ValueError("strategy: QUAIL compares whole logit vectors: use loss_chunk 0")
        return self

    @property
    def adapter(self) -> Adapter:
        """The weights that move: the strategy's."""
        return self.strategy.adapter

    @property
    def effective_lr(self) -> float:
        """The optimizer's learning rate: `lr` with the strategy's rule applied (SURE's factor)."""
        return self.strategy.lr(self.lr)

    @property
    def trains_on_forget_qa(self) -> bool:
        """IdkDPO's forget rows are the corpus's forget question/answer pairs (each with a refusal twin), not the
        raw forget documents."""
        return self.method == "idkdpo"

    @property
    def uses_reference_nll(self) -> bool:
        """NPO and IdkDPO compare each forget sequence's NLL with the model's before unlearning (computed once)."""
        return self.method in ("npo", "idkdpo")

    @property
    def uses_frozen_reference(self) -> bool:
        """Full fine-tuning keeps a frozen copy of the model when a term compares against it (KLR, QUAIL)."""
        return self.adapter == "full" and (self.reg in ("klr", "act") or self.method == "undial"
                                           or self.strategy.quail is not None)

    @classmethod
    def defaults(cls, name: DefaultsName, method: Method, reg: Reg,
                 strategy: Strategy | str = "full") -> "UnlearnConfig":
        """A named default set: "paper" (real models) or "tiny" (the built-in benchmark's model), for the
        strategy's adapter, with the strategy's open settings (SURE's lr factor) taken from the same set."""
        parsed = Strategy.parse(strategy)
        config = (cls.paper_defaults if name == "paper" else cls.tiny_defaults)(method, reg, parsed.adapter)
        return config.model_copy(update={"strategy": parsed.for_defaults(name)})

    @classmethod
    def paper_defaults(cls, method: Method, reg: Reg, adapter: Adapter) -> "UnlearnConfig":
        """The paper's settings for real models: full FT lr 1e-5, LoRA lr 1e-4 r=32 alpha=32 dropout 0.05,
        AdamW, constant schedule, 5 epochs, max length 2048, alpha per method from paper.md; activation
        checkpointing and chunked losses on, so a 7B model fits (see `qrunlearn unlearn --estimate`)."""
        batch, accum = PAPER_BATCH[adapter]
        alpha = PAPER_RMU_ACT_ALPHA if reg == "act" else PAPER_ALPHA[method]
        return cls(method=method, reg=reg, strategy=Strategy(adapter=adapter), lr=PAPER_LR[adapter], epochs=5,
                   batch_size=batch, grad_accum=accum, max_length=2048,
                   alpha=alpha if reg != "none" else 0.0, gradient_checkpointing=True,
                   loss_chunk=0 if method == "undial" else PAPER_LOSS_CHUNK)

    @classmethod
    def tiny_defaults(cls, method: Method, reg: Reg, adapter: Adapter) -> "UnlearnConfig":
        """Settings for the built-in ~4.3M-param model on the built-in corpus (measured: see the comment on
        TINY_LR above)."""
        return cls(method=method, reg=reg, strategy=Strategy(adapter=adapter), lr=TINY_LR[method, adapter],
                   epochs=TINY_EPOCHS[method, adapter],
                   batch_size=TINY_BATCH, grad_accum=1, max_length=TINY_MAX_LENGTH,
                   alpha=TINY_ALPHA[method] if reg != "none" else 0.0, rmu_coefficient=TINY_RMU_COEFFICIENT)
