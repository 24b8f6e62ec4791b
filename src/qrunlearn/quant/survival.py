"""How much of an unlearning update survives quantization, per layer and overall.

For base weights W and unlearned W' = W + dW, with dQ = Q(W') - Q(W) (dequantized):
- codes_changed_frac: share of integer codes that differ between Q(W) and Q(W') — codes, not dequantized values
  (a group's min/max drift changes most dequantized values without any code changing);
- projection = sum(dQ * dW) / sum(dW^2): how much of dW the quantized update carries along dW (1 = all, 0 = none);
- cosine(dQ, dW): how faithfully it points the same way (a norm ratio alone would hide a wrong direction);
- mean_abs_dw_in_steps: mean |dW| / step, the update's size in units of the layer's quantization step.
Works on any pair of full-precision models with the same architecture (full fine-tuning or merged LoRA alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant.common import (
    FULL_PRECISION_NOTE,
    is_plain_linear,
    linear_weight,
    target_linear_names,
)
from qrunlearn.quant.registry import quantize_weight
from qrunlearn.quant.spec import QuantSpec, parse_spec

LOW_PROJECTION = 0.5  # a layer "keeps < 50%" of its update below this projection


class LayerSurvival(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    numel: int
    codes_changed_frac: float
    projection: float | None  # None when the layer did not change (dW = 0)
    cosine: float | None
    mean_abs_dw: float
    mean_abs_dw_in_steps: float


@dataclass
class _Sums:
    """Running sums for the overall numbers (one pass over the layers)."""

    numel: int = 0
    changed: int = 0
    dq_dw: float = 0.0
    dw_dw: float = 0.0
    dq_dq: float = 0.0
    abs_dw: float = 0.0
    abs_dw_steps: float = 0.0


class SurvivalOverall(BaseModel):
    """The same quantities over every quantized layer together (sums, not a mean of layer ratios)."""

    layers: int
    numel: int
    codes_changed_frac: float
    projection: float | None
    cosine: float | None
    mean_abs_dw: float
    mean_abs_dw_in_steps: float
    layers_below_half: int


class SurvivalReport(BaseModel):
    spec: str
    verdict: str
    overall: SurvivalOverall
    layers: list[LayerSurvival]
    note: str = FULL_PRECISION_NOTE
    metadata: dict[str, Any] = Field(default_factory=dict)


def _layer_survival(name: str, w: torch.Tensor, w_new: torch.Tensor, spec: QuantSpec, sums: _Sums) -> LayerSurvival:
    q_base, q_new = quantize_weight(w, spec), quantize_weight(w_new, spec)
    dw = (w_new.float() - w.float()).reshape(-1).double()
    dq = (q_new.dequant - q_base.dequant).reshape(-1).double()
    changed = int((q_new.codes != q_base.codes).sum())
    dq_dw, dw_dw, dq_dq = float(dq @ dw), float(dw @ dw), float(dq @ dq)
    abs_dw = float(dw.abs().sum())
    abs_dw_steps = float((dw.abs() / q_base.step.reshape(-1).double()).sum())
    n = dw.numel()
    sums.numel += n
    sums.changed += changed
    sums.dq_dw += dq_dw
    sums.dw_dw += dw_dw
    sums.dq_dq += dq_dq
    sums.abs_dw += abs_dw
    sums.abs_dw_steps += abs_dw_steps
    projection, cosine = _ratios(dq_dw, dw_dw, dq_dq)
    return LayerSurvival(name=name, numel=n, codes_changed_frac=changed / n, projection=projection, cosine=cosine,
                         mean_abs_dw=abs_dw / n, mean_abs_dw_in_steps=abs_dw_steps / n)


def _ratios(dq_dw: float, dw_dw: float, dq_dq: float) -> tuple[float | None, float | None]:
    if dw_dw == 0.0:
        return None, None
    cosine = dq_dw / math.sqrt(dw_dw * dq_dq) if dq_dq > 0 else 0.0
    return dq_dw / dw_dw, cosine


def _verdict(spec: QuantSpec, layers: list[LayerSurvival], overall: SurvivalOverall) -> str:
    if overall.projection is None:
        return f"{spec.label}: the two models have identical weights in every quantized layer (no update)"
    changed_layers = [layer for layer in layers if layer.projection is not None]
    low = sum(1 for layer in changed_layers if layer.projection is not None and layer.projection < LOW_PROJECTION)
    return (f"{spec.label} keeps {overall.projection * 100:.0f}% of the update's projection, cosine "
            f"{overall.cosine:.2f}; {low} of {len(changed_layers)} layers keep < {LOW_PROJECTION:.0%} "
            f"({overall.codes_changed_frac * 100:.2f}% of codes changed, mean |dW| = "
            f"{overall.mean_abs_dw_in_steps:.3f} steps)")


def survival_report(base_model: nn.Module, unlearned_model: nn.Module, spec: QuantSpec | str) -> SurvivalReport:
    """Per-layer and overall survival of (unlearned - base) under `spec`. Both models full precision, same shapes."""
    spec = parse_spec(spec)
    if spec.is_noop:
        raise UserError("survival needs a quantizer, not 'fp'")
    names = target_linear_names(base_model)
    other = target_linear_names(unlearned_model)
    if names != other:
        raise UserError(f"base and unlearned models differ in their block linear layers ({len(names)} vs {len(other)})")
    sums, layers = _Sums(), []
    with torch.no_grad():
        for name in names:
            base, new = base_model.get_submodule(name), unlearned_model.get_submodule(name)
            if not (is_plain_linear(base) and is_plain_linear(new)):
                raise UserError(f"{name}: survival compares full-precision models; this layer is already quantized")
            w, w_new = linear_weight(base), linear_weight(new)
            if w.shape != w_new.shape:
                raise UserError(f"{name}: weight shapes differ ({tuple(w.shape)} vs {tuple(w_new.shape)})")
            layers.append(_layer_survival(name, w, w_new.to(w.device), spec, sums))
    projection, cosine = _ratios(sums.dq_dw, sums.dw_dw, sums.dq_dq)
    overall = SurvivalOverall(
        layers=len(layers), numel=sums.numel, codes_changed_frac=sums.changed / sums.numel, projection=projection,
        cosine=cosine, mean_abs_dw=sums.abs_dw / sums.numel, mean_abs_dw_in_steps=sums.abs_dw_steps / sums.numel,
        layers_below_half=sum(1 for layer in layers if layer.projection is not None
                              and layer.projection < LOW_PROJECTION))
    return SurvivalReport(spec=spec.label, layers=layers, overall=overall, verdict=_verdict(spec, layers, overall))


def plot_survival(report: SurvivalReport, png_path: Path | str) -> Path:
    """Per-layer bars: projection, cosine, codes changed, |dW| in steps (written atomically)."""
    plt = pyplot()
    x = list(range(len(report.layers)))
    panels = [("projection", "projection sum(dQ dW)/sum(dW^2)"), ("cosine", "cosine(dQ, dW)"),
              ("codes_changed_frac", "share of codes changed"), ("mean_abs_dw_in_steps", "mean |dW| / step")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.18 * len(x) + 2), 9), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        values = [getattr(layer, key) for layer in report.layers]
        ax.bar(x, [float("nan") if v is None else v for v in values], color="tab:blue")
        ax.set_ylabel(title, fontsize=8)
        if key == "projection":
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhline(LOW_PROJECTION, color="tab:red", lw=0.8, ls="--")
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([layer.name.split("layers.")[-1] for layer in report.layers], rotation=90, fontsize=6)
    fig.suptitle(report.verdict, fontsize=8, wrap=True)
    fig.tight_layout()
    return save_figure(fig, png_path)
