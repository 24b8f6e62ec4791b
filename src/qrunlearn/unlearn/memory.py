"""Predict an unlearning run's memory per process before it starts (`qrunlearn unlearn ... --estimate`).

The model is built from its config on the meta device (no weights are read, so a 7B hub config works offline
once its config.json is local) to count parameters exactly; the rest is arithmetic:

- weights: full fine-tuning's parameters in fp32 under mixed precision (plus the bf16 copies autocast keeps for the
  backward pass), in bf16 under pure bf16; LoRA's frozen base in the compute dtype and its adapters in fp32;
- gradients and AdamW's two moments: the trainable parameters (all for full fine-tuning, the adapters for LoRA);
- reference: full fine-tuning with KLR keeps a frozen copy in the compute dtype (LoRA disables its adapters
  instead; NPO keeps one number per forget chunk);
- activations: what autograd keeps per token and transformer block (counted tensor by tensor for a Llama-style
  block, see `_block_bytes_per_token`), or with checkpointing only each block's input;
- backward recompute (checkpointing only): while the backward pass recomputes a block, that block's activations
  exist again beside its gradient temporaries (the MLP's three intermediate-width gradients), the kept block
  inputs and the parameter gradients accumulated so far (counted whole: the first block is recomputed last);
- loss temporaries: the fp32 logits and the copies the loss and its gradient make, for the whole micro-batch or
  for one chunk of `loss_chunk` positions;
- the strategy's own (`strategy_terms`): SURE keeps the forget term's gradient beside the step's (one gradient-sized
  copy, from the forget term's own backward pass, where it and its clone exist beside the forward's kept activations,
  until the step; not at a step's first forward) and, at the optimizer step, the unselected rows of every partly
  selected parameter with their two AdamW moments (percentile / 100 of three trainable-sized tensors);
  quantization-aware unlearning keeps each block linear's Q(W) for the backward pass, in the compute dtype (LoRA:
  Q(W0 + s B A); W0 + s B A itself is not kept, and the quantized forward applies no LoRA dropout, so with `mix` 1
  peft's dropout copies are not kept either: `lora_dropout_kept`); QUAIL the reference's logits over the forget rows
  and their fp32 difference from the policy's.
Gradient accumulation (`grad_accum` > 1, or QAT's full-precision pass before the quantized one with `mix` < 1): the
gradients, and SURE's copy, of the step's earlier passes are alive during the later passes' forwards, so the forward's
peak counts them too (`accumulating`). Sharded (FSDP) quantities are divided by the number of processes; FSDP2 then
holds whole copies of what it has all-gathered, in the compute dtype: two blocks (the one computing and the one
prefetched) and the root's own parameters (embeddings, final norm, head), which the root keeps gathered between
forward and backward; mixed precision casts at the gather, so no autocast copies are kept. Validated against measured
peaks in benchmarks/bench_memory.py (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from pydantic import BaseModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.models.layers import block_list_names
from qrunlearn.models.loading import load_tokenizer, resolve_dtype
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.data import load_unlearn_data
from qrunlearn.unlearn.lora import default_lora_targets

# Full-vocabulary fp32 tensors alive at the loss's peak: logits, log-softmax (kept for backward) and the logits'
# gradient for the NLL; KL adds the reference's log-softmax, its exp and the difference.
NLL_LOGIT_COPIES = 3
KL_LOGIT_COPIES = 6
GIB = 1024**3


class MemoryEstimate(BaseModel):
    """Bytes per process."""

    parameters: int
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    activations: int
    loss_temporaries: int
    recompute: int = 0
    strategy_resident: int = 0  # SURE's forget-gradient copy: from the forget term's backward until the step
    strategy_forward: int = 0  # QAT's Q(W), QUAIL's reference logits: beside the activations
    strategy_step: int = 0  # SURE's clones of unselected rows and moments: beside the gradients, at the step
    method_forward: int = 0  # UNDIAL's reference logits and targets, RMU's reference states: beside the activations
    accumulating: bool = False  # several backward passes per optimizer step: gradients beside later forwards
    tokens_per_micro_batch: int
    processes: int

    @property
    def total(self) -> int:
        """The peak: gradients are freed after each optimizer step (zero_grad(set_to_none=True)) and grow during
        the backward pass while the activations are freed, so without accumulation they and the forward's
        activations and loss temporaries are not alive at once. The largest of: the forward's peak (with
        accumulation, beside the earlier passes' gradients and SURE's copy); SURE's forget-term backward (the kept
        activations, its new gradient and the copy); the gradients at the step (with SURE's copy and clones); and,
        with checkpointing, the backward pass's recompute (with SURE's copy)."""
        earlier = self.gradients + self.strategy_resident if self.accumulating else 0
        return (self.weights + self.optimizer + self.reference
                + max(self.gradients + self.strategy_resident + self.strategy_step,
                      self.activations + self.loss_temporaries + self.strategy_forward + self.method_forward + earlier,
                      self.activations + 2 * self.strategy_resident + earlier if self.strategy_resident else 0,
                      self.recompute + self.strategy_resident if self.recompute else 0))

    def describe(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("reference", self.reference), ("activations", self.activations),
                ("loss temporaries", self.loss_temporaries)] + (
                    [("backward recompute", self.recompute)] if self.recompute else []) + [
                    (f"strategy ({part})", value) for part, value in (
                        ("kept", self.strategy_resident), ("forward", self.strategy_forward),
                        ("step", self.strategy_step)) if value] + (
                    [("method (forward)", self.method_forward)] if self.method_forward else [])
        lines = [f"per process ({self.processes} process{'es' if self.processes > 1 else ''}; "
                 f"{self.parameters / 1e6:.1f}M parameters, {self.trainable_parameters / 1e6:.2f}M trainable; "
                 f"{self.tokens_per_micro_batch} tokens per micro-batch):"]
        lines += [f"  {name:<18} {value / GIB:8.2f} GiB" for name, value in rows]
        lines.append(f"  {'peak':<18} {self.total / GIB:8.2f} GiB  (weights + optimizer + reference + the largest of "
                     "gradients, activations + loss temporaries" + (" + gradients (accumulation)" if self.accumulating
                                                                   else "")
                     + (", backward recompute)" if self.recompute else ")"))
        return "\n".join(lines)


def meta_model(name_or_path: str | Path) -> PreTrainedModel:
    """The model's architecture with no storage behind its weights."""
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise UserError(f"{name_or_path}: cannot read the model config ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _lora_parameters(model: torch.nn.Module, config: UnlearnConfig) -> tuple[int, int]:
    """(adapter parameters, summed input + output widths of the adapted layers per block stack)."""
    targets = set(config.lora_targets or default_lora_targets(model))
    params, widths = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            params += config.lora_r * (module.in_features + module.out_features)
            widths += module.in_features
    return params, widths


def _block_and_root_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the largest transformer block, parameters outside the blocks)."""
    blocks = [block for name in block_list_names(model)
              for block in cast(torch.nn.ModuleList, model.get_submodule(name))]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    return largest, sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)


def _block_bytes_per_token(model_config, element: int) -> int:
    """Bytes autograd keeps per token for one Llama-style block: two RMSNorms (fp32 input and rsqrt kept, output in
    the compute dtype), q and k before rotary, q/k/v as attention sees them (key/value heads repeated), the
    attention output and o_proj's input, and the MLP's gate, activation, up and product."""
    h = model_config.hidden_size
    i = model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads) * (h // heads)
    norms = 2 * (4 * h + element * h)
    attention = element * (h + kv) + element * 3 * h + element * 2 * h
    mlp = element * 4 * i
    return norms + attention + mlp


def estimate_memory(model_path: str | Path, config: UnlearnConfig, processes: int = 1,
                    sequence_length: int | None = None, device: str = "cuda",
                    rows: int | None = None) -> MemoryEstimate:
    """Per-process bytes of an unlearning run of `model_path` with `config` on `processes` processes.
    `sequence_length`: the longest micro-batch's padded width (default: `config.max_length`)."""
    model = meta_model(model_path)
    model_config = model.config
    compute = resolve_dtype(config.dtype, device)
    mixed = compute == torch.bfloat16 and config.precision == "mixed"
    element = torch.finfo(compute).bits // 8
    params = sum(p.numel() for p in model.parameters())
    shard = processes if config.sharding == "fsdp" else 1
    if config.adapter == "lora":
        # a frozen base in the compute dtype; peft keeps the adapters (and so their gradients and moments) in fp32
        trainable, lora_widths = _lora_parameters(model, config)
        trainable_bytes = 4
        weights = (params * element + trainable * trainable_bytes) // shard
    else:
        trainable, lora_widths = params, 0
        trainable_bytes = 4 if (compute == torch.float32 or mixed) else 2
        weights = params * trainable_bytes // shard
        if mixed and shard == 1:
            weights += params * 2  # autocast's bf16 weight copies, kept until the backward pass has used them
    block, root = _block_and_root_parameters(model) if config.sharding == "fsdp" else (0, 0)
    weights += (2 * block + root) * element  # what FSDP2 holds gathered (nothing without sharding)
    gradients = trainable * trainable_bytes // shard
    optimizer = 2 * trainable * trainable_bytes // shard
    reference = params * element // shard if config.uses_frozen_reference else 0
    if reference:
        reference += block * element  # under FSDP, the block being gathered for its forward
    if config.reference_device == "cpu":
        reference = 0  # on the host, not on the training device

    length = sequence_length or config.max_length
    # IdkDPO's forget rows come with their refusal twins
    rows = rows or config.batch_size * ((2 if config.trains_on_forget_qa else 1) + (1 if config.reg != "none" else 0))
    tokens = rows * length
    layers = model_config.num_hidden_layers
    per_block = _block_bytes_per_token(model_config, element)
    if lora_dropout_kept(config):
        # peft's dropout output (lora_A's input) and its mask: a bool on CUDA, a scaled copy in the compute dtype on
        # the CPU (there dropout is x * mask)
        per_block += (element + (1 if device.startswith("cuda") else element)) * lora_widths // layers
    positions = min(config.loss_chunk, length) if config.loss_chunk else length
    copies = KL_LOGIT_COPIES if config.reg == "klr" else NLL_LOGIT_COPIES
    vocabulary = model_config.vocab_size
    logits_rows = rows // 2 if config.reg == "klr" and config.loss_chunk else rows  # chunked KL: the retain half
    loss = logits_rows * positions * vocabulary * 4 * copies
    if not config.loss_chunk:
        loss += rows * length * vocabulary * element  # the model's own logits output
    block_inputs = tokens * layers * model_config.hidden_size * element
    recompute = 0
    if config.gradient_checkpointing:
        activations = block_inputs  # each block's input is kept
        # after the loss temporaries are gone: one block's activations again, its gradient temporaries, all
        # gradients (measured on the tiny model with a 64-position loss chunk, where this is the peak: RESULTS.md)
        recompute = (gradients + block_inputs + tokens * per_block
                     + 3 * tokens * model_config.intermediate_size * element)
    else:
        activations = tokens * layers * per_block
    activations += tokens * model_config.hidden_size * (element + 4)  # embeddings out, final norm
    resident, forward, step = strategy_terms(model, config, gradients, element, rows, length)
    return MemoryEstimate(parameters=params, trainable_parameters=trainable, weights=weights, gradients=gradients,
                          optimizer=optimizer, reference=reference, activations=activations,
                          loss_temporaries=loss, recompute=recompute, strategy_resident=resident,
                          strategy_forward=forward, strategy_step=step,
                          method_forward=method_terms(model, config, element, rows, length),
                          accumulating=accumulates(config), tokens_per_micro_batch=tokens, processes=processes)


def method_terms(model: PreTrainedModel, config: UnlearnConfig, element: int, rows: int, length: int) -> int:
    """Bytes a forget objective holds beside the activations: UNDIAL the reference's forget-row logits (compute
    dtype) and, in fp32, the adjusted logits, their softmax target and the policy's log-softmax; RMU with its `act`
    term the reference's block states on the retain rows. `rows`: the micro-batch's forget + retain rows."""
    retain_rows = rows // 2 if config.reg != "none" else 0
    if config.method == "undial":
        return (rows - retain_rows) * length * int(model.config.vocab_size) * (element + 3 * 4)
    if config.method == "rmu" and config.reg == "act":
        return retain_rows * length * int(model.config.hidden_size) * element
    return 0


def strategy_terms(model: PreTrainedModel, config: UnlearnConfig, gradients: int, element: int, rows: int,
                   length: int) -> tuple[int, int, int]:
    """(kept all step, beside the activations, beside the gradients at the step) bytes of the run's strategy; see
    the module docstring. `gradients`: the run's gradient bytes per process."""
    strategy = config.strategy
    resident = forward = step = 0
    if strategy.sure is not None:
        resident = gradients
        step = int(3 * gradients * strategy.sure.percentile / 100)
    if strategy.qat is not None:
        # F.linear(x, Q(W)) keeps Q(W) for its input gradient (LoRA: Q(W0 + s B A); the sum is freed once quantized)
        linears = sum(module.weight.numel() for name in block_list_names(model)
                      for module in model.get_submodule(name).modules() if isinstance(module, torch.nn.Linear))
        forward += linears * element
    if strategy.quail is not None:
        forget_rows = max(1, rows // 2) if config.reg != "none" else rows
        vocabulary = int(model.config.vocab_size)
        forward += forget_rows * length * vocabulary * (element + 4)
    return resident, forward, step


def accumulates(config: UnlearnConfig) -> bool:
    """Whether a step runs several backward passes, so that earlier passes' gradients exist during a later forward:
    gradient accumulation, or QAT's full-precision pass before the quantized one (`mix` < 1). Passes a micro-batch
    splits into by length (`pass_cost_tokens`) are not counted: the estimate models one pass per micro-batch."""
    qat = config.strategy.qat
    return config.grad_accum > 1 or (qat is not None and qat.mix < 1)


def lora_dropout_kept(config: UnlearnConfig) -> bool:
    """Whether peft's LoRA dropout output and mask (per adapted layer, input-sized) are kept for the backward pass:
    not under quantization-aware unlearning with `mix` 1, whose quantized forward is F.linear(x, Q(W0 + s B A)),
    with no dropout (measured: benchmarks/RESULTS.md, "The strategies' memory")."""
    qat = config.strategy.qat
    return config.adapter == "lora" and config.lora_dropout > 0 and (qat is None or qat.mix < 1)


class MicroBatchShape(BaseModel):
    """The largest micro-batch the run will see: its padded width and its rows (forget + retain)."""

    length: int
    rows: int


def micro_batch_shape(model_path: str | Path, corpus: MuseCorpus, config: UnlearnConfig) -> MicroBatchShape | None:
    """The longest tokenised chunk the run would train on (a micro-batch's padded width is at most this) and the rows
    of a full micro-batch (fewer than the batch size when the corpus has fewer chunks), or None when the tokenizer
    is not available here. With the micro-batch's chunks grouped by length (`pass_cost_tokens`) a forward pass holds
    at most this shape, so the activation terms are an upper bound."""
    try:
        tokenizer = load_tokenizer(model_path)
    except UserError:
        return None
    data = load_unlearn_data(corpus, tokenizer, config.forget_split, config.retain_split,
                             needs_retain=config.reg != "none", max_length=config.max_length,
                             forget_from_qa=config.trains_on_forget_qa)
    forget_rows = min(config.batch_size, len(data.forget)) * (2 if data.preferred is not None else 1)
    rows = forget_rows + (min(config.batch_size, len(data.retain)) if data.retain else 0)
    return MicroBatchShape(length=max(len(chunk) for chunk in data.forget + data.retain), rows=rows)
