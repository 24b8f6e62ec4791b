"""SURE's building blocks: row saliency from the forget gradient, and an optimizer step on the salient rows only.

SURE (Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025, Sec. 6: "Saliency-Based
Unlearning with a Large Learning Rate") updates only the parts of the model most tied to the forget set, with a
learning rate large enough for the update to cross quantization bins. The paper calls its map "module-level"; the
reference code (zzwjames/FailureLLMUnlearning, baselines/baselines/iterative.py, class `SURE`) makes it per output
neuron, and that is what is implemented here:

- saliency of a row = L2 norm of the *forget loss's* gradient over that row (dim 0 of the parameter: an output
  neuron of a linear layer, a token of an embedding / lm_head); a 1-D parameter (norm weights, biases) has one
  "row" per element, its saliency |g|;
- eligible: every parameter that has a gradient (their loop runs over all `model.named_parameters()` with a grad:
  linear weights, embeddings, lm_head, norms, biases); pass exactly those to reproduce them;
- one threshold over all rows of all parameters together (their `np.percentile` over the concatenated
  per-neuron norms), not one per matrix; rows with norm >= threshold are selected (their `norm >= gamma`);
- their thresholds: 90-99 (CLI default 95).

Where this differs from their code, on purpose:
- their mask is built in `compute_loss` but applied in a method named `optimizer_step`, which the HF Trainer never
  calls (it calls `self.optimizer.step()` directly), so their runs updated every row; `masked_step` applies it;
- they back-propagate the forget loss once for the mask and again inside the total loss, so the forget term's
  gradient counts twice; and the `zero_grad()` before it wipes accumulated gradients of earlier micro-batches;
  here the mask is a pure function of gradients the caller computed (forget loss alone), and the update is the
  caller's business;
- a row whose forget gradient is exactly zero is never selected (theirs would be whenever the threshold is 0, e.g.
  the many embedding rows of tokens absent from the batch at a low percentile): it has no saliency by definition.
- their NPO is computed on raw logits (`ref.logits - model.logits`); the recipe's `objectives.npo_loss` is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from qrunlearn.errors import UserError


def check_percentile(percentile: float) -> float:
    """The percentile as a float, or a one-line UserError naming the strategy setting."""
    value = float(percentile)
    if not (0.0 < value < 100.0):  # also rejects nan
        raise UserError(f"SURE's percentile (strategy sure:percentile=P): must be strictly between 0 and 100 (SURE "
                        f"uses 90-99), got {percentile}")
    return value


def row_grad_norms(named_grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row L2 norm (fp32) of each gradient: [rows] for a [rows, ...] gradient, |g| for a 1-D one."""
    norms = {}
    for name, grad in named_grads.items():
        if grad.dim() == 0:
            raise ValueError(f"{name}: a 0-d parameter has no rows")
        norms[name] = grad.detach().float().reshape(grad.shape[0], -1).norm(dim=1)
    return norms


def percentile_linear(values: torch.Tensor, percentile: float) -> float:
    """The `percentile` of a 1-D tensor with linear interpolation between order statistics (numpy's default,
    `np.percentile`), in float64. Sorting instead of `torch.quantile`, whose input size is capped."""
    ordered = values.detach().double().flatten().sort().values
    position = (ordered.numel() - 1) * percentile / 100.0
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def row_saliency_masks(named_grads: Mapping[str, torch.Tensor], percentile: float) -> dict[str, torch.Tensor]:
    """SURE's saliency map: {name: bool [rows]}, True for rows whose forget-gradient norm is at or above the
    `percentile`-th percentile of all rows' norms (one threshold over every parameter given) and not zero.

    `named_grads`: the gradient of the forget loss alone (before any retain term is added) for every eligible
    parameter. The row with the largest norm is always selected unless every gradient is zero."""
    percentile = check_percentile(percentile)
    if not named_grads:
        raise ValueError("row_saliency_masks: no gradients given")
    norms = row_grad_norms(named_grads)
    threshold = percentile_linear(torch.cat([n.cpu() for n in norms.values()]), percentile)
    return {name: (norm >= threshold) & (norm > 0) for name, norm in norms.items()}


@dataclass
class _FrozenRows:
    """What an unselected part of one parameter held before the step."""

    param: torch.Tensor
    keep: torch.Tensor  # bool [rows]: rows to restore
    rows: torch.Tensor
    state_rows: dict[str, torch.Tensor] = field(default_factory=dict)


def _row_state(state: Mapping, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Optimizer state tensors laid out like the parameter (Adam's exp_avg / exp_avg_sq / max_exp_avg_sq,
    SGD's momentum_buffer); per-tensor scalars such as Adam's `step` are left out."""
    return {key: value for key, value in state.items() if torch.is_tensor(value) and value.shape == param.shape}


def _check_mask(name: str, param: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        raise ValueError(f"masked_step: no mask for parameter '{name}'")
    if mask.dtype != torch.bool or mask.shape != (param.shape[0],):
        raise ValueError(f"masked_step: mask of '{name}' must be bool [{param.shape[0]}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return mask.to(param.device)


def masked_step(optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor]) -> None:
    """`optimizer.step()` for the selected rows only: every unselected row of every parameter in `named_params`
    is bit-identical afterwards, and so is its optimizer state.

    Why the state too: SURE's update is theta <- theta - lr * (m_S * update), so an unselected row must not move.
    Masking the gradient instead (what their code meant to do) is not enough under AdamW: decoupled weight decay
    shrinks every row, and the momentum of earlier steps keeps moving rows whose gradient is now zero, and with
    SURE's large learning rate that drift is large. Keeping exp_avg / exp_avg_sq frozen as well means a row that is
    selected again later resumes from the moments it had when it was last updated, instead of from moments
    decayed as if it had seen zero gradients (it did not: its gradient was only not applied).

    What cannot be per row: AdamW's step count (bias correction) is one scalar per tensor. It advances when any
    row of the tensor is selected, so a row selected for the first time at tensor step t is bias-corrected with
    t, not 1: with betas (0.9, 0.999) its first update is 0.48x (t = 10), 0.98x (t = 100), 2.5x (t = 1000) the
    size of a fresh AdamW's first step, tending to (1 - beta1) / sqrt(1 - beta2) = 3.16x. A parameter with no
    selected row is skipped entirely (its gradient is hidden from the optimizer for the call), so its count does
    not advance and no memory is used for it.

    Requirements: an elementwise optimizer (SGD, Adam, AdamW: a row's update depends only on that row's gradient
    and state); state created by this step (the first step) is reset to zero on unselected rows, which is the
    "no history" state of all three. `optimizer` may be accelerate's wrapper (its `.state` is the inner one's).
    Gradients are not modified, so clip (if at all) before calling, on whatever gradients you mean to apply.
    Not for FSDP (flattened, sharded parameters have no rows). Extra memory: the unselected rows of partially
    selected parameters and their state, held until the step is done.
    """
    frozen: list[_FrozenRows] = []
    hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, param in named_params.items():
        if param.grad is None:
            continue
        mask = _check_mask(name, param, masks.get(name))
        if bool(mask.all()):
            continue
        if not bool(mask.any()):
            hidden.append((param, param.grad))
            param.grad = None
            continue
        keep = ~mask
        state = _row_state(optimizer.state.get(param, {}), param)
        frozen.append(_FrozenRows(param, keep, param.detach()[keep].clone(),
                                  {key: value[keep].clone() for key, value in state.items()}))
    try:
        optimizer.step()
    finally:
        for param, grad in hidden:
            param.grad = grad
    with torch.no_grad():
        for part in frozen:
            part.param[part.keep] = part.rows
            for key, value in _row_state(optimizer.state.get(part.param, {}), part.param).items():
                value[part.keep] = part.state_rows[key] if key in part.state_rows else 0
