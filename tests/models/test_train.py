"""Forward passes grouped by length: the cheapest split, and the trainer's batches computed in such passes equal
one padded pass."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.passes import length_groups
from qrunlearn.models.train import (
    TrainConfig,
    _batch_backward,
    collate,
    encode_documents,
    train_causal_lm,
)


def _gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_grouped_passes_give_the_one_pass_loss_and_gradient(tiny_model_dir, tiny_corpus):
    model, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    sequences = encode_documents(tokenizer, tiny_corpus.raw["forget"][:8], max_length=64)
    lengths = sorted({len(s) for s in sequences})
    assert len(lengths) > 2  # there is padding to save
    results = {}
    for cost in (10**9, 0):
        model.zero_grad(set_to_none=True)
        loss = _batch_backward(model, sequences, tokenizer.pad_token_id, torch.device("cpu"), cost)
        results[cost] = (loss.item(), _gradient(model))
    (one_loss, one_gradient), (grouped_loss, grouped_gradient) = results[10**9], results[0]
    batch = collate(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        mean = model(**batch).loss.item()  # HF's own token mean over the padded batch
    assert one_loss == pytest.approx(mean, rel=1e-6) and grouped_loss == pytest.approx(mean, rel=1e-6)
    assert (one_gradient - grouped_gradient).norm() < 1e-5 * one_gradient.norm()


def test_training_with_grouped_passes_lowers_the_loss(tiny_model_dir, tiny_corpus):
    model, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    config = TrainConfig(epochs=3, batch_size=4, lr=3e-3, max_length=64, pass_cost_tokens=0)
    result = train_causal_lm(model, tokenizer, tiny_corpus.raw["forget"][:8], config, progress=False)
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.1


def _padded_cost(lengths, groups, pass_cost):
    return sum(len(g) * max(lengths[i] for i in g) + pass_cost for g in groups)


@pytest.mark.parametrize("pass_cost", [0, 16, 64, 1000])
def test_length_groups_are_the_cheapest_contiguous_split(pass_cost):
    lengths = [129, 50, 256, 130, 60, 255, 128, 20]
    groups = length_groups(lengths, pass_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = math.inf  # brute force: every way to cut the sorted rows into contiguous runs
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for cut, row in zip(cuts, order[1:]):
            if cut:
                runs.append(run)
                run = []
            run.append(row)
        best = min(best, _padded_cost(lengths, runs + [run], pass_cost))
    assert _padded_cost(lengths, groups, pass_cost) == best


def test_length_groups_extremes():
    lengths = [129, 50, 256, 130, 60, 255, 128, 20]
    assert length_groups(lengths, 10**6) == [list(range(8))]  # one padded pass
    no_padding = length_groups(lengths, 0)
    assert all(len({lengths[i] for i in g}) == 1 for g in no_padding)
    # one pass: 8 rows padded to 256 = 2,048 tokens; at cost 64: {20, 50, 60} {128, 129, 130} {255, 256}, 1,082
    assert _padded_cost(lengths, length_groups(lengths, 64), 0) == 3 * 60 + 3 * 130 + 2 * 256
