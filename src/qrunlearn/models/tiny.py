"""The built-in tiny Llama: a byte-level BPE tokenizer trained on the benchmark and the model presets (the training
loop that makes target and retrain models from them is `qrunlearn.models.train`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SizeName = Literal["tiny", "small"]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    vocab_target: int = 2048


# Widths are multiples of 64 so quantizer groups and bitsandbytes' CPU kernels divide evenly.
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192,
                        vocab_target=1024),
    "small": ModelPreset(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704),
}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path | str | None = None):
    """A byte-level BPE with <pad>/<s>/</s>; encoding adds <s> in front (like Llama), so MUSE's
    'tokenise with special tokens' convention holds. A tiny corpus may stop below `vocab_size`.

    Words carry their *trailing* whitespace ("Answer:Ġ", "Drudrendstead"), not a leading one as in GPT-2. MUSE's
    KnowMem prompt ends in "Answer: ": with GPT-2-style pieces that trailing space becomes a lone token the model
    never saw before an answer word, and a model trained from scratch answers nothing (measured: KnowMem 0.0 on a
    target that reproduced its articles verbatim). With trailing whitespace the prompt's last token is exactly the
    one that precedes every answer in training."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*\S+\s*"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(preset: ModelPreset, vocab_size: int, tokenizer, seed: int):
    padded_vocab = int(math.ceil(vocab_size / 64) * 64)
    config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_attention_heads,
        max_position_embeddings=preset.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
