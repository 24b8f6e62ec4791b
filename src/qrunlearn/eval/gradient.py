"""The gradient of the forget answers' NLL with respect to every parameter, for `quant.survival.first_order`.

The loss is the one `eval.logprobs.answer_nll` scores, averaged over items: each item's mean NLL per answer token
given its prompt (teacher forcing, prompt tokens carry no loss), then the mean over items, so that a first-order
change of this loss is a change of the mean forget-answer NLL the evaluation reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qrunlearn.eval.generation import input_device, right_pad
from qrunlearn.models.heads import head_gives_logits, head_set_aside
from qrunlearn.typing import HFModel

# Most padded tokens in one backward pass, whatever the evaluation's batch size: the activations one pass keeps for
# its backward grow with its tokens (RESULTS.md, "The first-order diagnostic's memory"), and the sum over items is
# the same in any partition.
BACKWARD_TOKENS = {"cuda": 1 << 15, "cpu": 1 << 11}


def _check_items(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> None:
    if not prompts or len(prompts) != len(answers):
        raise ValueError(f"need as many answers as prompts, at least one ({len(prompts)} prompts, "
                         f"{len(answers)} answers)")
    # an empty answer has no mean NLL (answer_nll scores it NaN); a gradient of nothing would be a silent zero
    if any(not answer for answer in answers):
        raise ValueError("every answer needs at least one token: the loss is on answer tokens only")
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token: it predicts the answer's first token")


def _batch_loss(model: HFModel, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                direct: bool, items: int) -> torch.Tensor:
    """This batch's share of the loss: the sum over its items of mean answer NLL / `items` (all items' count)."""
    device = input_device(model)
    input_ids, _ = right_pad([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
    input_ids = input_ids.to(device)
    # right padding: a real token never attends to the pads after it, so no attention mask is needed (as in
    # `answer_nll`'s prefill)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    with head_set_aside(model, direct) as head:
        hidden = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
    # position t predicts token t + 1: the answer tokens are predicted from positions len(prompt) - 1 onwards
    picked = torch.cat([hidden[row, len(p) - 1:len(p) - 1 + len(a)]
                        for row, (p, a) in enumerate(zip(prompts, answers))])
    logits = picked if head is None else head(picked)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = torch.tensor([token for a in answers for token in a], device=logits.device)
    weights = torch.tensor([1.0 / (items * len(a)) for a in answers for _ in a], device=logits.device,
                           dtype=logits.dtype)
    return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum()


def _passes(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], batch_size: int,
            max_tokens: int) -> list[slice]:
    """Consecutive rows per backward pass: at most `batch_size`, and at most `max_tokens` once padded to the
    longest row of the pass (at least one row)."""
    passes, first = [], 0
    while first < len(prompts):
        last, longest = first, 0
        while last < len(prompts) and last - first < batch_size:
            longest = max(longest, len(prompts[last]) + len(answers[last]))
            if last > first and (last - first + 1) * longest > max_tokens:
                break
            last += 1
        passes.append(slice(first, last))
        first = last
    return passes


def answer_nll_gradient(model: HFModel, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                        pad_id: int, batch_size: int, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """d(mean over items of `answer_nll`)/d(parameter) for every parameter of a full-precision causal LM, by name
    as in `model.named_parameters()`, float32 on the CPU. Right-padded passes of at most `batch_size` items and
    `max_tokens` padded tokens (default: `BACKWARD_TOKENS` for the model's device), one backward pass each,
    accumulated. Runs in eval mode (no dropout: the loss the evaluation measures) and leaves the model in
    eval mode with its `requires_grad` flags restored and `.grad` cleared. Raises ValueError on an empty answer."""
    _check_items(prompts, answers)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if not param.is_floating_point():
            raise ValueError(f"{name} is {param.dtype}: the gradient needs a full-precision model")
    requires = {name: param.requires_grad for name, param in params.items()}
    model.eval()
    direct = head_gives_logits(model)
    if max_tokens is None:
        max_tokens = BACKWARD_TOKENS["cuda" if input_device(model).type == "cuda" else "cpu"]
    try:
        for param in params.values():
            param.requires_grad_(True)
            param.grad = None
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            for rows in _passes(prompts, answers, batch_size, max_tokens):
                _batch_loss(model, prompts[rows], answers[rows], pad_id, direct, len(prompts)).backward()
        return {name: torch.zeros(param.shape, dtype=torch.float32) if param.grad is None
                else param.grad.detach().to("cpu", torch.float32) for name, param in params.items()}
    finally:
        for name, param in params.items():
            param.grad = None
            param.requires_grad_(requires[name])
