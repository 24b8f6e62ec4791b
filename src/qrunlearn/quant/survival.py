"""How much of an unlearning update survives quantization, per layer and overall.

For base weights W and unlearned W' = W + dW, with dQ = Q(W') - Q(W) (dequantized):
- relative_error = ||dQ - dW|| / ||dW||: how far the quantized update is from the update (0 = carried exactly,
  1 = as far off as rounding the whole update away, > 1 = rounding noise larger than the update itself);
- mean_abs_dw_in_steps: mean |dW| / step, the update's size in units of the layer's quantization step;
- codes_changed_frac: share of integer codes that differ between Q(W) and Q(W') — codes, not dequantized values
  (a group's min/max drift changes most dequantized values without any code changing);
- projection = sum(dQ * dW) / sum(dW^2) and cosine(dQ, dW), kept for older results. Round-to-nearest is unbiased
  for weights spread over their bins (a weight crosses a boundary with probability |dW| / step and then moves one
  step), so E[dQ] = dW and the projection is about 1 for any update, however little of it survives element by
  element: it cannot tell whether a quantizer undoes unlearning.
`first_order` turns the weights into a prediction of the forget loss instead, from its gradient.
Works on any pair of full-precision models with the same architecture (full fine-tuning or merged LoRA alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from qrunlearn.errors import UserError
from qrunlearn.models.layers import PlainLinear, is_plain_linear, linear_weight, target_linear_names
from qrunlearn.plotting import pyplot, save_figure
from qrunlearn.quant.common import FULL_PRECISION_NOTE
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
    # None when dW = 0, and in results written before the field existed (so that they still load)
    relative_error: float | None = None


@dataclass
class _Sums:
    """Running sums for the overall numbers (one pass over the layers)."""

    numel: int = 0
    changed: int = 0
    dq_dw: float = 0.0
    dw_dw: float = 0.0
    dq_dq: float = 0.0
    err_err: float = 0.0
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
    relative_error: float | None = None  # as in LayerSurvival


class SurvivalReport(BaseModel):
    spec: str
    verdict: str
    overall: SurvivalOverall
    layers: list[LayerSurvival]
    note: str = FULL_PRECISION_NOTE
    metadata: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class _LayerPair:
    name: str
    module: PlainLinear  # the unlearned model's layer
    base: torch.Tensor  # W as [out, in]
    new: torch.Tensor  # W' as [out, in], on W's device


def _layer_pairs(base_model: nn.Module, unlearned_model: nn.Module) -> Iterator[_LayerPair]:
    """The weights of every layer the quantizers treat (`target_linear_names`) in both models, checked to match."""
    names = target_linear_names(base_model)
    other = target_linear_names(unlearned_model)
    if names != other:
        raise UserError(f"base and unlearned models differ in their block linear layers ({len(names)} vs {len(other)})")
    for name in names:
        base, new = base_model.get_submodule(name), unlearned_model.get_submodule(name)
        if not (is_plain_linear(base) and is_plain_linear(new)):
            raise UserError(f"{name}: survival compares full-precision models; this layer is already quantized")
        w, w_new = linear_weight(base), linear_weight(new)
        if w.shape != w_new.shape:
            raise UserError(f"{name}: weight shapes differ ({tuple(w.shape)} vs {tuple(w_new.shape)})")
        yield _LayerPair(name, new, w, w_new.to(w.device))


def _layer_survival(name: str, w: torch.Tensor, w_new: torch.Tensor, spec: QuantSpec, sums: _Sums) -> LayerSurvival:
    q_base, q_new = quantize_weight(w, spec), quantize_weight(w_new, spec)
    dw = (w_new.float() - w.float()).reshape(-1).double()
    dq = (q_new.dequant - q_base.dequant).reshape(-1).double()
    changed = int((q_new.codes != q_base.codes).sum())
    dq_dw, dw_dw, dq_dq = float(dq @ dw), float(dw @ dw), float(dq @ dq)
    # summed directly: dq_dq - 2 dq_dw + dw_dw cancels to noise exactly where dQ is close to dW
    err_err = float((dq - dw).square().sum())
    abs_dw = float(dw.abs().sum())
    abs_dw_steps = float((dw.abs() / q_base.step.reshape(-1).double()).sum())
    n = dw.numel()
    sums.numel += n
    sums.changed += changed
    sums.dq_dw += dq_dw
    sums.dw_dw += dw_dw
    sums.dq_dq += dq_dq
    sums.err_err += err_err
    sums.abs_dw += abs_dw
    sums.abs_dw_steps += abs_dw_steps
    projection, cosine = _ratios(dq_dw, dw_dw, dq_dq)
    return LayerSurvival(name=name, numel=n, codes_changed_frac=changed / n, projection=projection, cosine=cosine,
                         mean_abs_dw=abs_dw / n, mean_abs_dw_in_steps=abs_dw_steps / n,
                         relative_error=_relative_error(err_err, dw_dw))


def _ratios(dq_dw: float, dw_dw: float, dq_dq: float) -> tuple[float | None, float | None]:
    if dw_dw == 0.0:
        return None, None
    cosine = dq_dw / math.sqrt(dw_dw * dq_dq) if dq_dq > 0 else 0.0
    return dq_dw / dw_dw, cosine


def _relative_error(err_err: float, dw_dw: float) -> float | None:
    return math.sqrt(err_err / dw_dw) if dw_dw > 0.0 else None


def _verdict(spec: QuantSpec, overall: SurvivalOverall) -> str:
    if overall.relative_error is None:
        return f"{spec.label}: the two models have identical weights in every quantized layer (no update)"
    return (f"{spec.label}: relative error ||dQ - dW||/||dW|| = {overall.relative_error:.2f} (0: the update carried "
            f"exactly, 1: as far off as rounding it all away), mean |dW| = {overall.mean_abs_dw_in_steps:.3f} "
            f"quantization steps, {overall.codes_changed_frac * 100:.2f}% of codes changed")


def survival_report(base_model: nn.Module, unlearned_model: nn.Module, spec: QuantSpec | str) -> SurvivalReport:
    """Per-layer and overall survival of (unlearned - base) under `spec`. Both models full precision, same shapes."""
    spec = parse_spec(spec)
    if spec.is_noop:
        raise UserError("survival needs a quantizer, not 'fp'")
    sums, layers = _Sums(), []
    with torch.no_grad():
        for pair in _layer_pairs(base_model, unlearned_model):
            layers.append(_layer_survival(pair.name, pair.base, pair.new, spec, sums))
    projection, cosine = _ratios(sums.dq_dw, sums.dw_dw, sums.dq_dq)
    overall = SurvivalOverall(
        layers=len(layers), numel=sums.numel, codes_changed_frac=sums.changed / sums.numel, projection=projection,
        cosine=cosine, mean_abs_dw=sums.abs_dw / sums.numel, mean_abs_dw_in_steps=sums.abs_dw_steps / sums.numel,
        layers_below_half=sum(1 for layer in layers if layer.projection is not None
                              and layer.projection < LOW_PROJECTION),
        relative_error=_relative_error(sums.err_err, sums.dw_dw))
    return SurvivalReport(spec=spec.label, layers=layers, overall=overall, verdict=_verdict(spec, overall))


class FirstOrder(BaseModel):
    """First-order prediction of how quantization changes the unlearning effect on a loss L (float64 sums).

    With t the target, u = t + dW the unlearned model and g = dL/dparams at u, L(x) ~ L(u) + g.(x - u) near u, so
    L(u) - L(t) ~ g.dW = g_dw, L(Q(u)) - L(Q(t)) ~ g.(Q(u) - Q(t)) = g_dq (parameters the quantizer leaves alone
    carry dW into both, g_dw_unquantized), and L(Q(t)) - L(t) ~ g.(Q(t) - t) = g_target_shift.
    predicted_retained = g_dq / g_dw is the share of the effect left between the quantized models and
    predicted_reversion = 1 - it, the first-order counterpart of the precision-matched reversion `eval.effect`
    measures; both ratios are None when g_dw = 0.
    """

    model_config = ConfigDict(frozen=True)

    spec: str
    layers: int  # quantized layers
    g_dw: float
    g_dq: float
    g_dw_unquantized: float
    g_target_shift: float
    predicted_retained: float | None
    predicted_reversion: float | None


def _dot(g: torch.Tensor, x: torch.Tensor) -> float:
    return float(g.to(x.device, torch.float64).reshape(-1) @ x.double().reshape(-1))


def _check_gradient(model: nn.Module, gradient: dict[str, torch.Tensor]) -> None:
    names = {name for name, _ in model.named_parameters()}
    missing, unknown = sorted(names - gradient.keys()), sorted(gradient.keys() - names)
    if missing or unknown:
        raise UserError(f"the gradient must name exactly the unlearned model's parameters: missing {missing[:3]}, "
                        f"unknown {unknown[:3]} ({len(missing)} and {len(unknown)} in all)")


def first_order(base_model: nn.Module, unlearned_model: nn.Module, spec: QuantSpec | str,
                gradient: dict[str, torch.Tensor]) -> FirstOrder:
    """`FirstOrder` of (unlearned - base) under `spec`, for `gradient`: d(loss)/d(parameter) at the unlearned model
    by name, as in `unlearned_model.named_parameters()` (`eval.gradient.answer_nll_gradient` gives one)."""
    spec = parse_spec(spec)
    if spec.is_noop:
        raise UserError("first_order needs a quantizer, not 'fp'")
    _check_gradient(unlearned_model, gradient)
    base_params = dict(base_model.named_parameters())
    quantized: set[str] = set()
    g_dw = g_dq = g_shift = 0.0
    with torch.no_grad():
        for pair in _layer_pairs(base_model, unlearned_model):
            name = f"{pair.name}.weight"
            quantized.add(name)
            # the gradient has the parameter's layout; Conv1D stores its weight as [in, out]
            g = gradient[name].t() if isinstance(pair.module, Conv1D) else gradient[name]
            q_base, q_new = quantize_weight(pair.base, spec).dequant, quantize_weight(pair.new, spec).dequant
            g_dw += _dot(g, pair.new.double() - pair.base.double())
            g_dq += _dot(g, q_new.double() - q_base.double())
            g_shift += _dot(g, q_base.double() - pair.base.double())
        g_other = 0.0
        for name, param in unlearned_model.named_parameters():
            if name in quantized:
                continue
            base = base_params.get(name)
            if base is None or base.shape != param.shape:
                raise UserError(f"{name}: the base model has no parameter of shape {tuple(param.shape)} by that name")
            g_other += _dot(gradient[name], param.double() - base.to(param.device).double())
    g_dw, g_dq = g_dw + g_other, g_dq + g_other
    retained = g_dq / g_dw if g_dw != 0.0 else None
    return FirstOrder(spec=spec.label, layers=len(quantized), g_dw=g_dw, g_dq=g_dq, g_dw_unquantized=g_other,
                      g_target_shift=g_shift, predicted_retained=retained,
                      predicted_reversion=None if retained is None else 1.0 - retained)


def plot_survival(report: SurvivalReport, png_path: Path | str) -> Path:
    """Per-layer bars: relative error, |dW| in steps, codes changed, projection (written atomically)."""
    plt = pyplot()
    x = list(range(len(report.layers)))
    panels = [("relative_error", "||dQ - dW|| / ||dW||"), ("mean_abs_dw_in_steps", "mean |dW| / step"),
              ("codes_changed_frac", "share of codes changed"), ("projection", "projection sum(dQ dW)/sum(dW^2)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.18 * len(x) + 2), 9), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        values = [getattr(layer, key) for layer in report.layers]
        ax.bar(x, [float("nan") if v is None else v for v in values], color="tab:blue")
        ax.set_ylabel(title, fontsize=8)
        if key in ("relative_error", "projection"):
            ax.axhline(1.0, color="grey", lw=0.8)  # relative error 1: as if rounded away; projection 1: unbiased
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([layer.name.split("layers.")[-1] for layer in report.layers], rotation=90, fontsize=6)
    fig.suptitle(report.verdict, fontsize=8, wrap=True)
    fig.tight_layout()
    return save_figure(fig, png_path)
