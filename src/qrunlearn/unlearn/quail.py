"""QUAIL's building blocks: a logit-space hinge on forget examples and its margin rule (half a quantization step).

QUAIL (Mishra and Mehreen, "QUAIL: Quantization Aware Unlearning for Mitigating Misinformation in LLMs", arXiv
2601.15538) adds to GA+GDR a term that, "for each forget example, force[s] the output logits of the unlearned model
to differ from the original model by at least a margin (half the quantization step)", so that the forgetting is
not rounded away by 4-bit quantization.

Source status: only the abstract and third-party summaries of the paper could be read here, not its method
section. What they fix is above; a summary adds that the margin Delta_q is a hyperparameter and one global
threshold (not per layer). The rest is this module's reading, each choice marked [choice]:
- [choice] logits: the whole next-token logit vector at every scored position (the abstract's "output logits"),
  not only the target token's; distance: Euclidean, d_t = ||z_theta(t) - z_ref(t)||_2 over the vocabulary;
- [choice] hinge: max(0, margin - d_t), linear; reduction: mean over scored positions, with the recipe's optional
  global denominator (`num_tokens`), like every loss in `objectives`;
- [choice] margin: half the mean quantization step of the weights the deployed quantizer would quantize (one
  global number, `quail_margin`), taken as a logit distance as the abstract words it; whether the paper scales
  the weight step into logit units is unknown here.

Known weakness of this literal form: adding one constant c to every logit of a position changes no probability
but gives d_t = c * sqrt(V), so the hinge can be met without changing what the model predicts; and with margins
of ~1e-3..1e-2 it is met as soon as GA has moved the logits at all (measured on the built-in tiny Llama: one
AdamW step at lr 1e-5 puts every forget position beyond the rtn:w4g64 margin, while quantizing the original
model moves its logits 120-280x the margin). `logit_space_margin` is a margin in the hinge's units instead (half
the logit displacement quantization itself causes), and `logit_distance` lets a run log both distances.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.models.layers import is_plain_linear, linear_weight, target_linear_names
from qrunlearn.quant.common import check_group_divides
from qrunlearn.quant.registry import quantize_weight, require_backend
from qrunlearn.quant.spec import QuantSpec, parse_spec
from qrunlearn.unlearn.objectives import IGNORE_INDEX, shift


def logit_distance(logits: torch.Tensor, ref_logits: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Euclidean distance [B, T-1] between the two next-token logit vectors (fp32, 0 where the
    position is not scored) and the mask of scored positions. Its gradient at distance 0 is 0, not nan."""
    shifted, _, mask = shift(logits, labels)
    difference = shifted.float() - ref_logits[:, :-1].float()
    return torch.linalg.vector_norm(difference, dim=-1) * mask, mask


def quail_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, margin: float,
               num_tokens: float | None = None) -> torch.Tensor:
    """QUAIL's hinge: mean over scored positions of max(0, margin - ||z_theta - z_ref||_2) (see the module
    docstring for what is the paper's and what is this reading). `ref_logits` come from the model before
    unlearning on the same forget batch, without gradient. Zero once every position is `margin` away; below
    that, its gradient pushes each such position's logits straight away from the reference's."""
    if not margin >= 0:  # also rejects nan
        raise ValueError(f"quail_loss: margin must be >= 0, got {margin}")
    hinge = hinge_by_position(logits, ref_logits, labels, margin)
    denominator = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1) if num_tokens is None else num_tokens
    return hinge.sum() / denominator


def hinge_by_position(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                      margin: float) -> torch.Tensor:
    """max(0, margin - ||z_theta - z_ref||_2) per next-token position [B, T-1], 0 where the position is not scored
    (`quail_loss` is its mean; the recipe sums it over a micro-batch and divides by the global batch's count)."""
    distance, mask = logit_distance(logits, ref_logits, labels)
    return torch.clamp(margin - distance, min=0) * mask


def logit_space_margin(logits: torch.Tensor, quantized_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """An alternative margin in the hinge's own units [choice, not the paper's]: half the mean distance by which
    quantizing the original model moves its logits on a forget batch (`logits` from the model before unlearning,
    `quantized_logits` from the same model quantized at the deployment spec). Half a quantization step, mapped into
    logit space by measuring it rather than by a formula."""
    distance, mask = logit_distance(quantized_logits, logits, labels)
    return 0.5 * float(distance.sum() / mask.sum().clamp(min=1))


def half_mean_step(weights: Iterable[torch.Tensor], spec: QuantSpec | str) -> float:
    """Half the mean quantization step of `weights` ([out, in] each) under `spec`, averaged over every element
    (so a group's step counts once per weight it covers). The step is the quantizer's own (`QuantizedWeight.step`):
    the scale for RTN / HQQ / LLM.int8, the mean gap between levels times the block absmax for NF4 / FP4."""
    total, count = 0.0, 0
    with torch.no_grad():
        for weight in weights:
            step = quantize_weight(weight.detach(), spec).step
            total += float(step.double().sum())
            count += step.numel()
    if count == 0:
        raise UserError("QUAIL margin: no full-precision linear weights to take a quantization step from")
    return 0.5 * total / count


def quail_margin(model: nn.Module, spec: QuantSpec | str) -> float:
    """QUAIL's margin for `model` deployed at `spec`: half the mean quantization step over every linear layer
    inside the transformer blocks (the layers qrunlearn quantizes; embeddings and lm_head stay full precision).
    Compute it once, on the model before unlearning. GPTQ has no step without calibration data: UserError
    (its grid is the symmetric RTN one of the same bits and group, which the message suggests instead)."""
    spec = parse_spec(spec)
    if spec.is_noop:
        raise UserError("QUAIL margin: spec 'fp' has no quantization step; give the precision the model will be "
                        "deployed at (e.g. rtn:w4g64, nf4)")
    if spec.method == "gptq":
        proxy = f"rtn:w{spec.bits}" + (f"g{spec.group_size}" if spec.group_size else "") + ":sym"
        raise UserError(f"QUAIL margin: {spec.label} steps depend on calibration data; use the symmetric RTN "
                        f"grid of the same width ({proxy}) as its step")
    require_backend(spec)
    check_group_divides(model, spec.row_group, spec.label)
    modules = (model.get_submodule(name) for name in target_linear_names(model))
    return half_mean_step((linear_weight(m) for m in modules if is_plain_linear(m)), spec)
