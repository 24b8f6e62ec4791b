"""Token statistics and MIA scores: hand-built values, and batched == one text at a time."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from qrunlearn.eval import logprobs
from qrunlearn.eval.logprobs import TokenStats, mia_scores, score_texts, token_stats


def _stats(rows: list[list[float]]) -> TokenStats:
    width = max(len(r) for r in rows)
    logprob = torch.zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        logprob[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return TokenStats(logprob=logprob, mu=torch.zeros_like(logprob), sigma=torch.ones_like(logprob), mask=mask)


def test_min_k_loss_and_zlib_hand_built():
    # 10 log-probs; int(0.4 * 10) = 4 lowest: -5, -4, -3, -2 -> Min-40% = 3.5; int(0.05 * 10) = 0 -> lowest one
    row = [-1.0, -5.0, -0.5, -4.0, -0.1, -3.0, -0.2, -2.0, -0.3, -0.4]
    scores = mia_scores(_stats([row, row[:3]]), torch.tensor([20.0, 10.0]))
    assert scores["min_k_40"][0].item() == pytest.approx(3.5)
    assert scores["min_k_5"][0].item() == pytest.approx(5.0)
    assert scores["min_k_60"][0].item() == pytest.approx((5 + 4 + 3 + 2 + 1 + 0.5) / 6)
    assert scores["loss"][0].item() == pytest.approx(-sum(row) / 10)
    assert scores["zlib"][0].item() == pytest.approx(-sum(row) / 10 / 20)
    # the padded second row (3 tokens): int(0.4 * 3) = 1 -> its lowest, -5; padding never counts
    assert scores["min_k_40"][1].item() == pytest.approx(5.0)
    assert scores["n_tokens"].tolist() == [10, 3]


def test_min_k_pp_standardises_by_the_model_distribution():
    stats = _stats([[-1.0, -2.0, -3.0, -4.0, -5.0]])
    stats = TokenStats(stats.logprob, mu=torch.full_like(stats.logprob, -1.0),
                       sigma=torch.full_like(stats.logprob, 2.0), mask=stats.mask)
    scores = mia_scores(stats, torch.tensor([1.0]))
    # z = (lp + 1) / 2 = [0, -0.5, -1, -1.5, -2]; int(0.4 * 5) = 2 lowest: -2, -1.5
    assert scores["min_k_pp"][0].item() == pytest.approx(1.75)


def test_token_stats_match_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    stats = token_stats(logits, ids, mask)
    log_p = torch.log_softmax(logits, -1)
    assert stats.logprob[0, 2].item() == pytest.approx(log_p[0, 2, ids[0, 3]].item(), abs=1e-6)
    p = log_p[1, 1].exp()
    mean = (p * log_p[1, 1]).sum()
    assert stats.mu[1, 1].item() == pytest.approx(mean.item(), abs=1e-6)
    assert stats.sigma[1, 1].item() == pytest.approx(((p * (log_p[1, 1] - mean) ** 2).sum()).sqrt().item(), abs=1e-5)
    assert stats.mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_token_stats_from_hidden_states_in_chunks_match_the_full_logits(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 7, 8)
    ids = torch.randint(0, 11, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    full = token_stats(head(hidden), ids, mask)
    # vocabulary slices of 4, 4 and 3 entries; 2 positions per tile: 3 tiles of positions per row
    monkeypatch.setitem(logprobs._STATS_VOCAB_TILE, "cpu", 4)
    monkeypatch.setitem(logprobs._STATS_TILE_ELEMENTS, "cpu", 2 * 4)
    chunked = token_stats(hidden, ids, mask, head=head)
    real = full.mask
    for name in ("logprob", "mu", "sigma"):
        expected, got = getattr(full, name)[real], getattr(chunked, name)[real]
        assert torch.allclose(got, expected, atol=1e-6), name
    # pads are never computed: they keep the neutral values the scores mask out anyway
    assert chunked.logprob[1, 3:].tolist() == [0.0] * 3 and chunked.sigma[1, 3:].tolist() == [1.0] * 3


def test_statistics_merged_across_vocabulary_slices_equal_one_softmax(monkeypatch):
    """Slices whose largest logits differ by far more than exp's range in float32: the merge must rescale each to
    the common max (without it the low slice's mass would be counted as if it were the top one's)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 10, dtype=torch.float64)
    logits[..., 5:] += 60.0
    logits[1, :, :5] += 120.0  # in row 1 the first slice holds the max
    ids = torch.randint(0, 10, (3, 6))
    ids[:, 1::2] = 2  # every other target in the low slice: positions 0, 2 and 4 score token 2
    mask = torch.ones_like(ids)
    monkeypatch.setitem(logprobs._STATS_VOCAB_TILE, "cpu", 5)
    sliced = token_stats(logits.float(), ids, mask)
    log_p = torch.log_softmax(logits[:, :-1], -1)
    p = log_p.exp()
    mean = (p * log_p).sum(-1)
    sigma = (p * (log_p - mean[..., None]).square()).sum(-1).sqrt()
    expected_logprob = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(sliced.logprob.double(), expected_logprob, atol=1e-4)
    assert torch.allclose(sliced.mu.double(), mean, atol=1e-4)
    assert torch.allclose(sliced.sigma.double(), sigma, rtol=1e-4, atol=1e-6)
    # a target far below the max has a tiny probability: its log p (about -60) must survive the merge
    assert sliced.logprob[0, 0].item() < -50.0


def test_a_head_that_is_not_a_plain_linear_is_applied_whole(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 11, bias=True))
    hidden = torch.randn(1, 5, 8)
    ids = torch.randint(0, 11, (1, 5))
    mask = torch.ones_like(ids)
    monkeypatch.setitem(logprobs._STATS_VOCAB_TILE, "cpu", 4)
    whole = token_stats(hidden, ids, mask, head=head)
    expected = token_stats(head(hidden), ids, mask)
    assert torch.allclose(whole.logprob, expected.logprob, atol=1e-6)
    assert torch.allclose(whole.sigma, expected.sigma, atol=1e-6)


def test_batched_scores_equal_one_at_a_time(tiny_model_dir, tiny_corpus):
    from qrunlearn.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    texts = tiny_corpus.privleak["forget"][:5] + ["A short one."]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    zl = [len(zlib.compress(t.encode())) for t in texts]
    batched = score_texts(model, ids, zl, tokenizer.pad_token_id, batch_size=4)
    for i in range(len(texts)):
        single = score_texts(model, [ids[i]], [zl[i]], tokenizer.pad_token_id, batch_size=1)
        for name, values in batched.items():
            # Min-K%++ divides by the spread of log p over the vocabulary, which an untrained model keeps tiny
            # (a near-flat distribution), so 1e-7 logit noise from another matmul shape shows up as ~1e-5
            tolerance = 1e-4 if name == "min_k_pp" else 1e-5
            assert values[i] == pytest.approx(single[name][0], rel=tolerance, abs=1e-6), name
    # and the loss equals the model's own mean cross-entropy on the unpadded text
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[0]]), labels=torch.tensor([ids[0]]))
    assert batched["loss"][0] == pytest.approx(out.loss.item(), rel=1e-5)
    assert np.all(np.isfinite(batched["min_k_pp"])) and not math.isnan(batched["zlib"][0])


def test_answer_nll_equals_teacher_forced_cross_entropy(tiny_model_dir):
    from qrunlearn.eval.logprobs import answer_nll
    from qrunlearn.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    questions = ("Question: Where?\nAnswer: ", "Question: Who is it?\nAnswer: ")
    prompts = [tokenizer(text)["input_ids"] for text in questions]
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Drudrendstead", "a historian")]
    batched = answer_nll(model, prompts, answers, tokenizer.pad_token_id, batch_size=2)
    for prompt, answer, value in zip(prompts, answers, batched):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).item()
        assert value == pytest.approx(expected, rel=1e-5)
    assert batched[0] != pytest.approx(batched[1])


def test_answer_nll_with_a_shared_prefix_equals_the_full_pass(tiny_model_dir, tiny_corpus):
    from qrunlearn.eval.generation import shared_prefix
    from qrunlearn.eval.logprobs import answer_nll
    from qrunlearn.eval.muse import knowmem_prompt
    from qrunlearn.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu")
    icl, qa = tiny_corpus.knowmem["forget_qa_icl"], tiny_corpus.knowmem["forget_qa"][:5]
    prompts = [tokenizer(knowmem_prompt(icl, pair.question))["input_ids"] for pair in qa]
    answers = [tokenizer(pair.answer, add_special_tokens=False)["input_ids"] for pair in qa]
    prefix = shared_prefix(model, prompts)
    assert prefix is not None and prefix.length > len(prompts[0]) // 2  # the few-shot block is most of the prompt
    full = answer_nll(model, prompts, answers, tokenizer.pad_token_id, batch_size=3)
    shared = answer_nll(model, prompts, answers, tokenizer.pad_token_id, batch_size=3, prefix=prefix)
    np.testing.assert_allclose(shared, full, rtol=1e-5)
    assert len(set(np.round(full, 4))) > 1


def _capped_gemma():
    """A model whose logits are its head's output soft-capped (Gemma 2), with logits large enough for the cap to
    matter."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
                          max_position_embeddings=128, pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


def test_a_model_that_transforms_its_logits_is_scored_on_its_own_logits(tiny_model_dir):
    from qrunlearn.eval.logprobs import answer_nll
    from qrunlearn.models.heads import head_gives_logits
    from qrunlearn.models.loading import load_causal_lm

    assert head_gives_logits(load_causal_lm(tiny_model_dir, device="cpu")[0])
    model = _capped_gemma()
    assert not head_gives_logits(model)
    torch.manual_seed(1)
    texts = [torch.randint(1, 97, (n,)).tolist() for n in (12, 7, 9)]
    scores = score_texts(model, texts, [10, 10, 10], pad_id=0, batch_size=3)
    nll = answer_nll(model, [t[:5] for t in texts], [t[5:] for t in texts], pad_id=0, batch_size=3)
    for i, ids in enumerate(texts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        assert logits.abs().max() > 4.0  # the cap is active
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
        assert scores["loss"][i] == pytest.approx(loss, rel=1e-5)
        answer = torch.nn.functional.cross_entropy(logits[4:-1], torch.tensor(ids[5:])).item()
        assert nll[i] == pytest.approx(answer, rel=1e-5)
