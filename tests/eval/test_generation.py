"""Batched greedy decoding: equal to one prompt at a time and to `model.generate`, on several architectures;
left truncation of long prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qrunlearn.eval.generation import encode, eos_token_ids, generate_batch, greedy_generate, pad_token_id


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from qrunlearn.models.loading import load_causal_lm

    return load_causal_lm(tiny_model_dir, device="cpu")


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _llama_gqa_tied(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _prompts(tokenizer, corpus, n=6):
    texts = [item.prompt for item in corpus.verbmem[:n]] + ["Question: who?\nAnswer: "]
    return encode(tokenizer, texts, None, keep="last").ids


@pytest.mark.parametrize("arch", ["tiny_llama", "gpt2", "llama_gqa_tied"])
def test_batched_equals_single_and_generate(arch, tiny, tiny_corpus):
    model, tokenizer = tiny
    if arch == "gpt2":
        model = _gpt2(model.config.vocab_size)
    elif arch == "llama_gqa_tied":
        model = _llama_gqa_tied(model.config.vocab_size)
    prompts = _prompts(tokenizer, tiny_corpus)
    assert len({len(p) for p in prompts}) > 2  # really different lengths, so real left padding
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    batched = greedy_generate(model, prompts, 24, pad, eos, batch_size=4)
    single = greedy_generate(model, prompts, 24, pad, eos, batch_size=1)
    assert batched == single
    for ids, new in zip(prompts[:3], single[:3]):
        reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=24, do_sample=False, pad_token_id=pad)
        assert reference[0, len(ids):].tolist() == new


def test_rows_stop_at_eos_and_keep_it(tiny, tiny_corpus):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, tiny_corpus, n=3)
    free = generate_batch(model, prompts, 12, tokenizer.pad_token_id, eos_ids=())
    # declare each row's 5th generated token an eos: rows then end right after it, other rows unaffected
    fifth = {row[4] for row in free}
    stopped = generate_batch(model, prompts, 12, tokenizer.pad_token_id, eos_ids=tuple(fifth))
    for full, cut in zip(free, stopped):
        first_eos = next(i for i, t in enumerate(full) if t in fifth)
        assert cut == full[:first_eos + 1]


def test_should_stop_cuts_rows_early(tiny, tiny_corpus):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, tiny_corpus, n=3)
    out = generate_batch(model, prompts, 12, tokenizer.pad_token_id, eos_ids=(), should_stop=lambda t: len(t) >= 3)
    assert [len(row) for row in out] == [3] * len(prompts)


def test_left_truncation_keeps_bos_and_the_end(tiny):
    _, tokenizer = tiny
    text = "word " * 50
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    encoded = encode(tokenizer, [text, "short"], 10, keep="last")
    assert encoded.truncated == [True, False]
    assert encoded.n_truncated == 1
    assert encoded.ids[0] == [tokenizer.bos_token_id] + full[-9:]
    first = encode(tokenizer, [text], 10, keep="first")
    assert first.ids[0] == full[:10]


def test_shared_prefix_gives_the_same_tokens(tiny, tiny_corpus):
    from qrunlearn.eval.generation import MIN_SHARED_PREFIX, common_prefix_length, shared_prefix, shared_prefix_length
    from qrunlearn.eval.muse import knowmem_prompt

    model, tokenizer = tiny
    icl = tiny_corpus.knowmem["forget_qa_icl"]
    texts = [knowmem_prompt(icl, pair.question) for pair in tiny_corpus.knowmem["forget_qa"][:5]]
    prompts = encode(tokenizer, texts, None, keep="last").ids
    assert common_prefix_length(prompts) >= MIN_SHARED_PREFIX  # the few-shot block is shared
    eos = eos_token_ids(model, tokenizer)
    prefix = shared_prefix(model, prompts)
    assert prefix is not None and prefix.length == shared_prefix_length(prompts)
    assert prefix.length == min(common_prefix_length(prompts), min(map(len, prompts)) - 1)
    assert shared_prefix_length(prompts[:1]) == 0 and shared_prefix_length([p[:10] for p in prompts]) == 0
    shared = greedy_generate(model, prompts, 16, tokenizer.pad_token_id, eos, batch_size=2, prefix=prefix)
    plain = greedy_generate(model, prompts, 16, tokenizer.pad_token_id, eos, batch_size=2)
    assert shared == plain
    reference = model.generate(torch.tensor([prompts[0]]),
                               attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long), max_new_tokens=16,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert reference[0, len(prompts[0]):].tolist() == shared[0]


def test_decode_threads_apply_to_the_decoding_steps_only(tiny, tiny_corpus):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, tiny_corpus, n=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def record(tokens: list[int]) -> bool:  # called inside the decoding loop
            seen.append(torch.get_num_threads())
            return False

        single = generate_batch(model, prompts, 6, tokenizer.pad_token_id, eos_ids=(), should_stop=record,
                                decode_threads=1)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert single == generate_batch(model, prompts, 6, tokenizer.pad_token_id, eos_ids=())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_split_into_passes_gives_the_same_tokens_and_nll(with_prefix, tiny, tiny_corpus, monkeypatch):
    """A batch over `PASS_POSITIONS` is prefilled a few rows a pass and decoded together: the same tokens as one
    pass (different widths per pass, so zero-filled pads in the joined cache), and the same answer NLLs."""
    from qrunlearn.eval import generation
    from qrunlearn.eval.generation import prefill_prompts, shared_prefix
    from qrunlearn.eval.logprobs import answer_nll
    from qrunlearn.eval.muse import knowmem_prompt

    model, tokenizer = tiny
    if with_prefix:
        icl = tiny_corpus.knowmem["forget_qa_icl"]
        pairs = tiny_corpus.knowmem["forget_qa"][:5]
        prompts = encode(tokenizer, [knowmem_prompt(icl, pair.question) for pair in pairs], None, keep="last").ids
        prefix = shared_prefix(model, prompts)
        assert prefix is not None
    else:
        prompts, prefix = _prompts(tokenizer, tiny_corpus), None
    answers = [p[-3:] for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    whole = greedy_generate(model, prompts, 16, pad, eos, batch_size=8, prefix=prefix)
    whole_nll = answer_nll(model, prompts, answers, pad, batch_size=8, prefix=prefix)
    shared = prefix.length if prefix is not None else 0
    suffix_width = max(len(p) for p in prompts) - shared
    monkeypatch.setitem(generation.PASS_POSITIONS, "cpu", 2 * suffix_width)  # two rows a pass
    passes = []
    real_prefill = generation.prefill

    def counting_prefill(model, input_ids, *args, **kwargs):
        passes.append(tuple(input_ids.shape))
        return real_prefill(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "prefill", counting_prefill)
    run = prefill_prompts(model, prompts, pad, prefix, room=4)
    assert len(passes) == (len(prompts) + 1) // 2 and len({width for _, width in passes}) > 1
    assert run.hidden.shape[0] == len(prompts) and run.cache.get_seq_length() == shared + suffix_width
    split = greedy_generate(model, prompts, 16, pad, eos, batch_size=8, prefix=prefix)
    assert split == whole
    np.testing.assert_allclose(answer_nll(model, prompts, answers, pad, batch_size=8, prefix=prefix), whole_nll,
                               rtol=1e-5, atol=1e-6)
