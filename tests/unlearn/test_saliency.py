"""SURE's saliency masks (hand-computed row norms and percentiles) and the masked optimizer step (unselected rows
bit-identical under AdamW with weight decay and momentum)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.unlearn import objectives
from qrunlearn.unlearn.saliency import masked_step, percentile_linear, row_grad_norms, row_saliency_masks


def _hand_grads() -> dict[str, torch.Tensor]:
    """Row norms: a -> [5, 1, 2] (3-4-5 row, a unit row, four ones); b (1-D) -> [0.5, 3]."""
    return {
        "a": torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0], [1.0, -1.0, 1.0, 1.0]]),
        "b": torch.tensor([0.5, -3.0]),
    }


def test_row_grad_norms_hand_values():
    norms = row_grad_norms(_hand_grads())
    assert norms["a"].tolist() == [5.0, 1.0, 2.0]
    assert norms["b"].tolist() == [0.5, 3.0]


@pytest.mark.parametrize(("percentile", "a", "b"), [
    (50, [True, False, True], [False, True]),   # sorted [0.5, 1, 2, 3, 5]: position 2.0 -> 2
    (60, [True, False, False], [False, True]),  # position 2.4 -> 2 + 0.4 * (3 - 2) = 2.4
    (90, [True, False, False], [False, False]),  # position 3.6 -> 3 + 0.6 * (5 - 3) = 4.2
])
def test_masks_hand_values(percentile, a, b):
    masks = row_saliency_masks(_hand_grads(), percentile)
    assert masks["a"].tolist() == a
    assert masks["b"].tolist() == b
    assert masks["a"].dtype == torch.bool


def test_threshold_is_global_over_all_parameters_not_per_matrix():
    """At the 90th percentile 'b' keeps no row although its best row (3) is far above its other one: a
    per-matrix threshold would have kept it."""
    masks = row_saliency_masks(_hand_grads(), 90)
    assert not masks["b"].any()


def test_percentile_matches_numpy():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.5, 37.3, 90, 95, 99, 99.9):
        assert percentile_linear(values, q) == pytest.approx(float(np.percentile(values.double().numpy(), q)),
                                                             rel=1e-12)


@pytest.mark.parametrize("bad", [0, 100, -5, 150, float("nan")])
def test_percentile_out_of_range_is_a_one_line_user_error(bad):
    with pytest.raises(UserError) as err:
        row_saliency_masks(_hand_grads(), bad)
    message = str(err.value)
    assert "sure:percentile=P" in message and "\n" not in message


def test_percentile_edges_ties_and_zero_rows():
    grads = _hand_grads()
    tiny = row_saliency_masks(grads, 1e-9)
    assert tiny["a"].all() and tiny["b"].all()  # threshold ~ the smallest norm: every (non-zero) row
    top = row_saliency_masks(grads, 99.999)
    assert top["a"].tolist() == [True, False, False] and not top["b"].any()  # only the largest row survives
    ties = row_saliency_masks({"t": torch.ones(4, 3)}, 99)
    assert ties["t"].all()  # equal norms: all at the threshold, all selected (>=)
    # 3 of 4 rows have zero gradient: the threshold is 0 at the 50th percentile, yet zero rows stay unselected
    sparse = torch.zeros(4, 3)
    sparse[2, 1] = 1.0
    assert row_saliency_masks({"e": sparse}, 50)["e"].tolist() == [False, False, True, False]
    assert not row_saliency_masks({"z": torch.zeros(3, 2)}, 50)["z"].any()


# ---- masked_step ------------------------------------------------------------------------------------------------

def _toy(seed: int = 0) -> tuple[dict[str, nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(seed)
    params = {"w": nn.Parameter(torch.randn(4, 3)), "v": nn.Parameter(torch.randn(5))}
    return params, torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.1)


def _set_random_grads(params: dict[str, nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=generator)


def _snapshot(params, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        out[name] = {"param": p.detach().clone(),
                     **{k: state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}}
    return out


def test_masked_step_keeps_unselected_rows_bit_identical_under_adamw():
    params, optimizer = _toy()
    all_rows = {"w": torch.ones(4, dtype=torch.bool), "v": torch.ones(5, dtype=torch.bool)}
    for step in range(3):  # momentum and second moments in every row first
        _set_random_grads(params, seed=step)
        masked_step(optimizer, params, all_rows)
    before = _snapshot(params, optimizer)
    masks = {"w": torch.tensor([True, False, False, True]), "v": torch.tensor([False, True, False, False, False])}
    for step in range(3, 8):
        _set_random_grads(params, seed=step)
        masked_step(optimizer, params, masks)
    after = _snapshot(params, optimizer)
    for name, mask in masks.items():
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after[name][key][~mask], before[name][key][~mask]), (name, key)
            assert not torch.equal(after[name][key][mask], before[name][key][mask]), (name, key)
        assert not torch.isclose(after[name]["param"][mask], before[name]["param"][mask]).any()


def test_masking_the_gradient_alone_would_move_unselected_rows():
    """Why masked_step restores rows: with the gradient of a row zeroed, AdamW still moves it (weight decay and the
    momentum of earlier steps), so a plain gradient mask does not freeze it."""
    params, optimizer = _toy()
    _set_random_grads(params, seed=0)
    optimizer.step()
    frozen_row = params["w"].detach()[1].clone()
    _set_random_grads(params, seed=1)
    params["w"].grad[1] = 0.0
    optimizer.step()
    assert not torch.isclose(params["w"].detach()[1], frozen_row).any()


def test_reselected_row_resumes_from_its_saved_moments():
    params, optimizer = _toy()
    every = {"w": torch.ones(4, dtype=torch.bool), "v": torch.ones(5, dtype=torch.bool)}
    _set_random_grads(params, seed=0)
    masked_step(optimizer, params, every)
    saved = optimizer.state[params["w"]]["exp_avg"][2].clone()
    skip_row_2 = {"w": torch.tensor([True, True, False, True]), "v": every["v"]}
    for step in (1, 2):
        _set_random_grads(params, seed=step)
        masked_step(optimizer, params, skip_row_2)
    _set_random_grads(params, seed=3)
    grad = params["w"].grad[2].clone()
    masked_step(optimizer, params, every)
    beta1 = optimizer.param_groups[0]["betas"][0]
    # one AdamW update from the moments it had two steps ago, not from moments decayed by two zero gradients
    assert torch.allclose(optimizer.state[params["w"]]["exp_avg"][2], beta1 * saved + (1 - beta1) * grad)


def test_first_step_and_fully_unselected_parameters():
    params, optimizer = _toy()
    start = {name: p.detach().clone() for name, p in params.items()}
    _set_random_grads(params, seed=0)
    grad_v = params["v"].grad
    masks = {"w": torch.tensor([False, True, False, False]), "v": torch.zeros(5, dtype=torch.bool)}
    masked_step(optimizer, params, masks)
    state_w = optimizer.state[params["w"]]
    assert torch.equal(params["w"].detach()[~masks["w"]], start["w"][~masks["w"]])
    assert not torch.isclose(params["w"].detach()[1], start["w"][1]).any()
    # state created by this step: zero ("no history") on the unselected rows, the update's moments on row 1
    assert not state_w["exp_avg"][~masks["w"]].any() and not state_w["exp_avg_sq"][~masks["w"]].any()
    assert state_w["exp_avg"][1].abs().min() > 0
    # no selected row: untouched, no optimizer state created, its gradient handed back
    assert torch.equal(params["v"].detach(), start["v"])
    assert params["v"] not in optimizer.state or not optimizer.state[params["v"]]
    assert params["v"].grad is grad_v


def test_masks_must_cover_and_fit_every_parameter():
    params, optimizer = _toy()
    _set_random_grads(params, seed=0)
    with pytest.raises(ValueError, match="no mask for parameter 'v'"):
        masked_step(optimizer, params, {"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool \\[4\\]"):
        masked_step(optimizer, params, {"w": torch.ones(3, dtype=torch.bool), "v": torch.ones(5, dtype=torch.bool)})


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_sure_step_on_a_llama_with_the_forget_gradient():
    """The whole SURE step on a small Llama: GA gradient -> masks over every parameter (embeddings, norms, ...)
    -> AdamW at a large learning rate; every unselected row of every parameter stays bit-identical."""
    model = _tiny_llama()
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(named.values(), lr=1e-2, weight_decay=0.01)
    input_ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))  # tokens 32.. unseen
    objectives.ga_loss(model(input_ids=input_ids).logits, input_ids).backward()
    grads = {name: p.grad for name, p in named.items() if p.grad is not None}
    assert set(grads) == set(named)  # every parameter is eligible and has a forget gradient
    masks = row_saliency_masks(grads, 90)
    selected = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert 0 < selected <= math.ceil(0.1 * total) + 1
    assert not masks["model.embed_tokens.weight"][32:].any()  # unseen tokens have zero gradient
    before = {name: p.detach().clone() for name, p in named.items()}
    masked_step(optimizer, named, masks)
    moved = 0
    for name, p in named.items():
        assert torch.equal(p.detach()[~masks[name]], before[name][~masks[name]]), name
        moved += int((p.detach() != before[name]).reshape(p.shape[0], -1).any(dim=1).sum())
    assert moved == selected


def test_masked_step_through_accelerates_optimizer_wrapper():
    """The recipe's optimizer is accelerate's AcceleratedOptimizer: its `.state` and `.step()` reach the inner one."""
    from accelerate import Accelerator

    params, optimizer = _toy()
    wrapped = Accelerator().prepare_optimizer(optimizer)
    assert wrapped is not optimizer
    _set_random_grads(params, seed=0)
    start = params["w"].detach().clone()
    masks = {"w": torch.tensor([True, False, False, False]), "v": torch.ones(5, dtype=torch.bool)}
    masked_step(wrapped, params, masks)
    assert torch.equal(params["w"].detach()[1:], start[1:]) and not torch.equal(params["w"].detach()[0], start[0])
    assert not optimizer.state[params["w"]]["exp_avg"][1:].any()
