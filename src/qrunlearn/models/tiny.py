"""The built-in tiny Llama: a byte-level BPE tokenizer trained on the benchmark, model presets, and a plain
training loop (AdamW, warmup + cosine, per-document sequences) used to make the target and retrain models."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
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
from tqdm.auto import tqdm
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


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    max_length: int = 256
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def encode_documents(tokenizer, docs: list[str], max_length: int) -> list[list[int]]:
    """<s> doc </s>, cut into windows of at most `max_length` tokens (long documents become several)."""
    encoded = tokenizer(docs, add_special_tokens=True)["input_ids"]
    sequences: list[list[int]] = []
    for ids in encoded:
        ids = list(ids) + [tokenizer.eos_token_id]
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length]
            if len(chunk) > 1:
                sequences.append(chunk)
    return sequences


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on padding."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train_causal_lm(model, tokenizer, docs: list[str], config: TrainConfig, desc: str = "train",
                    progress: bool = True) -> TrainResult:
    """Next-token training on `docs` until the epochs are done; returns per-epoch mean losses and speed."""
    sequences = encode_documents(tokenizer, docs, config.max_length)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(sequences) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress_frac))
        return config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    device = next(model.parameters()).device
    model.train()
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    for _epoch in range(config.epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        losses = []
        for first in range(0, len(order), config.batch_size):
            batch = collate([sequences[i] for i in order[first:first + config.batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            result.tokens += int(batch["attention_mask"].sum())
            bar.update(1)
            bar.set_postfix(epoch=_epoch + 1, loss=f"{loss.item():.3f}")
        result.epoch_losses.append(sum(losses) / len(losses))
    bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    return result
