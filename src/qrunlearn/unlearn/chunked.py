"""Next-token NLL and KL from the final hidden states, a chunk of positions at a time.

A causal LM's logits for a batch are [B, T, V] values: with a 262k vocabulary at 2,048 tokens that is ~2 GB per
sequence per fp32 copy, and the loss code needs several copies (the logits, their fp32 log-softmax, its gradient).
Here the output head is applied to `chunk` positions at a time, each chunk's fp32 logits are reduced to one number
per position straight away, and the backward pass recomputes a chunk's logits to form its gradient (the softmax
minus the target, or minus p_ref for KL), so no more than one chunk's logits ever exist. The results equal the
full-logits path of `objectives.token_nll` / `token_kl` up to float summation order.

The hidden states come from the model's own forward with its output head set aside (`models.heads`), so
DDP and accelerate see an ordinary forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrunlearn.unlearn.objectives import IGNORE_INDEX


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # type: ignore[override]
        ctx.autocast = _autocast_state(hidden.device)
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.shape[1], chunk):
            stop = start + chunk
            logits = _logits(hidden[:, start:stop], weight, bias)
            out[:, start:stop] = F.cross_entropy(logits.flatten(0, 1), targets[:, start:stop].flatten(),
                                                 reduction="none").view(logits.shape[:2])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors

        def logit_grad(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            grad = torch.softmax(logits, dim=-1)
            grad.scatter_add_(-1, targets[:, start:stop, None], torch.full_like(grad[..., :1], -1.0))
            return grad

        return (*_head_backward(ctx, hidden, weight, bias, grad_out, logit_grad), None, None)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk):  # type: ignore[override]
        ctx.autocast = _autocast_state(hidden.device)
        out = torch.empty(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[1], chunk):
            stop = start + chunk
            log_p = F.log_softmax(_logits(hidden[:, start:stop], weight, bias), dim=-1)
            log_ref = F.log_softmax(_logits(ref_hidden[:, start:stop], ref_weight, ref_bias), dim=-1)
            out[:, start:stop] = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors

        def logit_grad(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            with torch.no_grad():
                p_ref = torch.softmax(_logits(ref_hidden[:, start:stop], ref_weight, ref_bias), dim=-1)
            return torch.softmax(logits, dim=-1) - p_ref  # d KL(p_ref || p) / d logits

        return (*_head_backward(ctx, hidden, weight, bias, grad_out, logit_grad), None, None, None, None)


def _head_backward(ctx, hidden, weight, bias, grad_out, logit_grad):
    """Gradients of sum(grad_out * statistic) w.r.t. hidden, head weight and bias, a chunk at a time."""
    enabled, dtype = ctx.autocast
    grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
        else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
        if bias is not None and ctx.needs_input_grad[2] else None
    with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
        for start in range(0, hidden.shape[1], ctx.chunk):
            stop = start + ctx.chunk
            h = hidden[:, start:stop]
            logits = _logits(h, weight, bias)
            d_logits = logit_grad(logits, start, stop) * grad_out[:, start:stop, None]
            if grad_hidden is not None:
                grad_hidden[:, start:stop] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += d_logits.flatten(0, 1).t() @ h.flatten(0, 1).float()
            if grad_bias is not None:
                grad_bias += d_logits.sum(dim=(0, 1))
    return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None)


def chunked_token_nll(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T-1] (0 on masked positions) and the mask, like `objectives.token_nll`, from the final
    hidden states [B, T, H] and the output head (an nn.Linear)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = _ChunkedNLL.apply(hidden[:, :-1], head.weight, head.bias, targets.masked_fill(~mask, 0), chunk)
    return nll * mask, mask


def chunked_token_kl(hidden: torch.Tensor, head: nn.Linear, ref_hidden: torch.Tensor, ref_head: nn.Linear,
                     labels: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(p_ref || p_theta) [B, T-1] and the mask, like `objectives.token_kl`; the reference side
    (hidden states and head) carries no gradient."""
    mask = labels[:, 1:] != IGNORE_INDEX
    kl = _ChunkedKL.apply(hidden[:, :-1], head.weight, head.bias, ref_hidden[:, :-1].detach(),
                          ref_head.weight.detach(), None if ref_head.bias is None else ref_head.bias.detach(), chunk)
    return kl, mask
