"""The model before unlearning, as NPO and KLR need it, at the policy's own precision.

- NPO needs only each forget chunk's summed NLL under the reference: constants, computed once through the same
  forward path as training (same model, precision and loss code, so at step 0 the log-ratio is exactly 0) and kept
  with the run (`reference_nll.safetensors`), so a resumed run reuses them instead of recomputing.
- KLR needs the reference's next-token distribution on every retain batch (QUAIL: its logits on every forget
  batch). LoRA gets it from the same model with
  its adapters disabled (no copy). Full fine-tuning keeps a frozen copy: in the compute dtype, without gradients or
  optimizer state, sharded like the policy under FSDP, or on the CPU when `reference_device: cpu` (slower, but the
  accelerator then holds only the policy).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.io import library_write_errors
from qrunlearn.models.heads import hidden_states_forward
from qrunlearn.models.layers import block_output
from qrunlearn.quant.fake import fake_quantized
from qrunlearn.typing import HFModel
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.parallel import FullySharded, Parallel, compute_dtype
from qrunlearn.unlearn.strategy import Qat

NLL_FILE = "reference_nll.safetensors"


def cached_reference_nll(out_dir: Path, fingerprint: str, compute: Callable[[], torch.Tensor],
                         parallel: Parallel) -> torch.Tensor:
    """The forget chunks' reference NLLs: read from `out_dir` when they belong to this run, else computed and
    written there (by the main process; every process computes them, as a sharded forward needs all of them)."""
    path = out_dir / NLL_FILE
    cached = _read_nll(path, fingerprint)
    if cached is not None:
        return cached
    values = compute()
    if parallel.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        with library_write_errors(path):
            save_file({"nll": values.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    parallel.wait()
    return values


def _read_nll(path: Path, fingerprint: str) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return handle.get_tensor("nll")
    except (OSError, json.JSONDecodeError, RuntimeError, ValueError):
        return None


class Reference:
    """The model before unlearning as KLR and QUAIL see it: a frozen copy for full fine-tuning, the adapters-disabled
    model for LoRA. Under quantization-aware unlearning it is quantized like the policy (`fake_quantized`, installed
    for the run with the policy's), so both sides of each comparison are the deployed models."""

    def __init__(self, config: UnlearnConfig, model: HFModel, parallel: Parallel):
        self.copy: HFModel | None = None
        self.parallel = parallel
        self.device = parallel.device
        if not config.uses_frozen_reference:
            return
        if config.reference_device == "cpu" and parallel.sharded:
            raise UserError("--reference-device cpu: not with --sharding fsdp (the reference is sharded instead)")
        self.device = torch.device("cpu") if config.reference_device == "cpu" else parallel.device
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        frozen = frozen.to(device=self.device, dtype=compute_dtype(config, parallel.device))
        self.copy = parallel.shard(frozen) if isinstance(parallel, FullySharded) else frozen
        self.head: nn.Linear = self.copy.get_output_embeddings()
        if self.device != parallel.device:  # the chunked KL applies the head beside the policy's hidden states
            self.head = copy.deepcopy(self.head).to(parallel.device)

    def fake_quantized(self, setting: Qat) -> contextlib.AbstractContextManager:
        """The frozen copy fake-quantized like the policy, for the run (LoRA's reference is the policy itself with
        its adapters off, quantized with it)."""
        if self.copy is None:
            return contextlib.nullcontext()
        return fake_quantized(self.copy, setting.spec)

    @torch.no_grad()
    def logits(self, policy: HFModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.parallel.autocast():
            if self.copy is not None:
                out = self.copy(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
                return out.logits.to(self.parallel.device)
            with policy.disable_adapter():
                return policy(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def block_states(self, policy: HFModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     block: Callable[[nn.Module], nn.Module]) -> torch.Tensor:
        """RMU: the output [B, T, H] of one transformer block (`block(transformer)` finds it) under the reference."""
        with self.parallel.autocast():
            if self.copy is not None:
                with block_output(block(self.copy)) as captured:
                    self.copy(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
                return captured[0].to(self.parallel.device)
            with policy.disable_adapter(), block_output(block(policy.get_base_model())) as captured:
                policy(input_ids=input_ids, attention_mask=attention_mask)
            return captured[0]

    @torch.no_grad()
    def hidden_states(self, policy: HFModel, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
        """Final hidden states [B, T, H] and the output head, for the chunked KL."""
        with self.parallel.autocast():
            if self.copy is not None:
                with hidden_states_forward(self.copy):
                    out = self.copy(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
                return out.logits.to(self.parallel.device), self.head
            with policy.disable_adapter(), hidden_states_forward(policy.get_base_model()) as head:
                return policy(input_ids=input_ids, attention_mask=attention_mask).logits, head
