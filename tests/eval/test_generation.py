"""Batched greedy decoding: equal to one prompt at a time and to `model.generate`, on several architectures;
left truncation of long prompts."""

from __future__ import annotations

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
