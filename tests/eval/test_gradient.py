"""The forget-answer NLL gradient: against finite differences of `answer_nll` itself, and its contract."""

import pytest
import torch

from qrunlearn.eval.gradient import answer_nll_gradient
from qrunlearn.eval.logprobs import answer_nll


@pytest.fixture
def tiny_double(tiny_model_dir):
    """The tiny Llama in float64, so that finite differences resolve the directional derivative."""
    from qrunlearn.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    return model.double().eval(), tokenizer


def _items(tokenizer):
    questions = ("Question: Where?\nAnswer: ", "Question: Who is it, and where?\nAnswer: ", "Q: When?\nA: ")
    answers = ("Drudrendstead", "a historian of the north", "in 1812")
    prompts = [tokenizer(text)["input_ids"] for text in questions]
    return prompts, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in answers]


def test_gradient_equals_a_finite_difference_of_the_mean_answer_nll(tiny_double):
    """Central difference of `answer_nll` (3 items of different lengths, gradient in batches of 2: padding and
    accumulation across batches both count) along a unit direction over every parameter, half the gradient's own
    direction and half random: a random direction alone is almost orthogonal to the gradient in ~10^5 dimensions,
    and its derivative (~0.01) would drown in answer_nll's noise (its cross-entropy is float32: a few 1e-7 on a
    loss of ~7). Along this direction the derivative is ~3; with step 1e-3 that noise is at most ~1e-4 of it and the
    step^2 truncation term ~1e-5 (measured: 2e-5 off in all): tolerance 2e-4 relative."""
    model, tokenizer = tiny_double
    prompts, answers = _items(tokenizer)
    pad = tokenizer.pad_token_id
    gradient = answer_nll_gradient(model, prompts, answers, pad, batch_size=2)
    params = dict(model.named_parameters())
    assert gradient.keys() == params.keys()
    assert all(g.dtype == torch.float32 and g.device.type == "cpu" and g.shape == params[n].shape
               for n, g in gradient.items())
    gen = torch.Generator().manual_seed(0)
    noise = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64) for name, p in params.items()}
    direction = {name: _unit(gradient)[name] + _unit(noise)[name] for name in params}
    direction = _unit(direction)

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for name, p in params.items():
                p.add_(step * direction[name])
            value = float(answer_nll(model, prompts, answers, pad, batch_size=3).mean())
            for name, p in params.items():
                p.sub_(step * direction[name])
        return value

    step = 1e-3
    finite = (loss_at(step) - loss_at(-step)) / (2 * step)
    analytic = sum(float((gradient[name].double() * direction[name]).sum()) for name in params)
    assert analytic > 0.1  # the loss really changes along it
    assert analytic == pytest.approx(finite, rel=2e-4)


def _unit(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = sum(float(v.double().square().sum()) for v in vectors.values()) ** 0.5
    return {name: v.double() / norm for name, v in vectors.items()}


def test_prompt_tokens_carry_no_loss(tiny_double):
    """The gradient is that of the answer positions' cross-entropy alone: a single item's gradient equals autograd of
    the mean NLL over logits[len(prompt) - 1:-1], not of the whole text's."""
    model, tokenizer = tiny_double
    prompts, answers = _items(tokenizer)
    gradient = answer_nll_gradient(model, prompts[1:2], answers[1:2], tokenizer.pad_token_id, batch_size=1)
    ids = torch.tensor([prompts[1] + answers[1]])
    logits = model(input_ids=ids).logits[0, len(prompts[1]) - 1:-1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(answers[1])).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(gradient[name], param.grad.float(), rtol=1e-5, atol=1e-8)
    model.zero_grad(set_to_none=True)


def test_an_empty_answer_is_an_error_not_a_zero_gradient(tiny_double):
    model, tokenizer = tiny_double
    prompts, answers = _items(tokenizer)
    with pytest.raises(ValueError, match="every answer needs at least one token"):
        answer_nll_gradient(model, prompts, [answers[0], [], answers[2]], tokenizer.pad_token_id, batch_size=2)
    with pytest.raises(ValueError, match="as many answers as prompts"):
        answer_nll_gradient(model, prompts, answers[:2], tokenizer.pad_token_id, batch_size=2)


def test_model_is_left_in_eval_mode_with_its_flags_and_no_grad(tiny_double):
    model, tokenizer = tiny_double
    prompts, answers = _items(tokenizer)
    model.train()
    frozen = model.get_input_embeddings().weight
    frozen.requires_grad_(False)
    with torch.no_grad():  # a caller inside evaluation code still gets the gradient
        gradient = answer_nll_gradient(model, prompts, answers, tokenizer.pad_token_id, batch_size=3)
    assert not model.training
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    name = next(n for n, p in model.named_parameters() if p is frozen)
    assert gradient[name].abs().sum() > 0  # a frozen parameter's gradient is computed all the same


def test_passes_are_bounded_by_padded_tokens_and_sum_to_the_same_gradient(tiny_double):
    """A token budget below two rows' length splits every batch into single-row passes (what bounds the backward
    pass's activations, whatever the evaluation's batch size); the gradient is the same sum."""
    model, tokenizer = tiny_double
    prompts, answers = _items(tokenizer)
    pad = tokenizer.pad_token_id
    rows = []  # the rows of every embedding call with the items' tokens (not `head_gives_logits`' 2-token probe)
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[0]) if args[0].shape[1] > 2 else None)
    try:
        whole = answer_nll_gradient(model, prompts, answers, pad, batch_size=3, max_tokens=10_000)
        assert rows == [3]
        rows.clear()
        shortest = min(len(p) + len(a) for p, a in zip(prompts, answers))
        split = answer_nll_gradient(model, prompts, answers, pad, batch_size=3, max_tokens=shortest + 1)
    finally:
        handle.remove()
    assert rows == [1, 1, 1]  # one row per backward pass
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-5, atol=1e-7)
