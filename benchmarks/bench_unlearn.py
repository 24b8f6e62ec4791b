"""Unlearning speed and memory, measured side by side in one run (ratios are what matter; absolute numbers
depend on the machine and its load).

1. tokens/s of full fine-tuning vs LoRA (GA+GDR) on the built-in 'small' Llama (~4.3M params);
2. tokens/s of our loop vs a plain HF `Trainer` doing the same GA step (same model, batches, AdamW, lr,
   clipping); goal: ours >= 1.0x;
3. peak RSS of NPO+KLR full vs LoRA on a ~30M-param Llama (h512, 8 layers), each in a fresh subprocess;
   goal <= 0.4x. Reported as the whole process's peak and as the peak above the RSS just before `unlearn()`.

    .venv/bin/python benchmarks/bench_unlearn.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SMALL = "small"
BIG = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408)


def _make_model(out: Path, corpus, preset) -> None:
    from qrunlearn.models.tiny import build_model, train_tokenizer

    texts = [t for docs in corpus.raw.values() for t in docs]
    tok = train_tokenizer(texts, vocab_size=2048, out_dir=out)
    build_model(preset, len(tok), tok, seed=0).save_pretrained(out)


def _ours(model_dir: Path, corpus, config, out: Path) -> float:
    from qrunlearn.unlearn import unlearn

    result = unlearn(model_dir, corpus, config, out, progress=False, resume=False)
    return result.tokens / result.seconds


def _trainer_ga(model_dir: Path, corpus, config, out: Path) -> float:
    """HF Trainer, compute_loss = -NLL (GA without a retain term), same chunks and batch size."""
    from transformers import Trainer, TrainingArguments

    from qrunlearn.models.loading import load_causal_lm
    from qrunlearn.models.train import collate
    from qrunlearn.unlearn.data import load_unlearn_data

    model, tok = load_causal_lm(model_dir, dtype="float32", device="cpu")
    data = load_unlearn_data(corpus, tok, "forget", "retain1", False, config.max_length)

    class GATrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (-outputs.loss, outputs) if return_outputs else -outputs.loss

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=config.epochs, learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=config.max_grad_norm, report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, use_cpu=True,
        seed=config.seed, disable_tqdm=True)
    dataset = [{"ids": ids} for ids in data.forget]
    trainer = GATrainer(model=model, args=args, train_dataset=dataset,
                        data_collator=lambda rows: collate([r["ids"] for r in rows], tok.pad_token_id))
    metrics = trainer.train().metrics
    tokens = sum(len(s) for s in data.forget) * config.epochs
    return tokens / metrics["train_runtime"]


def _rss_child(model_dir: str, data_dir: str, adapter: str, out: str) -> None:
    """Run NPO+KLR in this (fresh) process and print its memory as JSON."""
    from qrunlearn.data.muse import load_corpus
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    torch.set_num_threads(2)
    corpus = load_corpus(data_dir)
    corpus.raw["forget"] = corpus.raw["forget"][:16]
    config = UnlearnConfig.tiny_defaults("npo", "klr", adapter).model_copy(
        update={"epochs": 1, "batch_size": 4, "max_length": 128})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    unlearn(model_dir, corpus, config, out, progress=False, resume=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"adapter": adapter, "rss_before_mb": before, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss-child", nargs=4, metavar=("MODEL", "DATA", "ADAPTER", "OUT"))
    parser.add_argument("--rss-hidden", type=int, default=BIG["hidden_size"],
                        help="hidden size of the memory model (512: 27.8M params; 1024 with --rss-inter 2816: 107M)")
    parser.add_argument("--rss-inter", type=int, default=BIG["intermediate_size"])
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(*args.rss_child)
        return

    from qrunlearn.data.muse import load_corpus, write_corpus
    from qrunlearn.data.synth import SynthConfig, generate_corpus
    from qrunlearn.models.tiny import PRESETS, ModelPreset
    from qrunlearn.unlearn import UnlearnConfig

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_unlearn_"))
    write_corpus(generate_corpus(SynthConfig(seed=0, size="small")), work / "data")
    corpus = load_corpus(work / "data")
    _make_model(work / "small", corpus, PRESETS[SMALL])
    big = {**BIG, "hidden_size": args.rss_hidden, "intermediate_size": args.rss_inter,
           "num_attention_heads": args.rss_hidden // 64}
    _make_model(work / "big", corpus, ModelPreset(**big))
    n_big = sum(p.numel() for p in __import__("safetensors.torch").torch.load_file(
        str(work / "big" / "model.safetensors")).values())

    results: dict[str, list[float]] = {"full": [], "lora": [], "ours_ga": [], "trainer_ga": []}
    ga = UnlearnConfig.tiny_defaults("ga", "none", "full").model_copy(update={"epochs": 2})
    for r in range(args.repeats):  # interleaved, best of N: the machine may be shared
        for adapter in ("full", "lora"):
            config = UnlearnConfig.tiny_defaults("ga", "gdr", adapter).model_copy(update={"epochs": 2})
            results[adapter].append(_ours(work / "small", corpus, config, work / f"run_{adapter}"))
        results["ours_ga"].append(_ours(work / "small", corpus, ga, work / "run_ga"))
        results["trainer_ga"].append(_trainer_ga(work / "small", corpus, ga, work / f"trainer_{r}"))
    best = {k: max(v) for k, v in results.items()}

    rss = {}
    for adapter in ("full", "lora"):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(work / "big"), str(work / "data"),
                               adapter, str(work / f"rss_{adapter}")], capture_output=True, text=True, check=True)
        rss[adapter] = json.loads(proc.stdout.strip().splitlines()[-1])
    delta = {a: rss[a]["peak_mb"] - rss[a]["rss_before_mb"] for a in rss}

    print(f"model 'small' (~4.3M params), GA+GDR, 2 epochs, best of {args.repeats}:")
    print(f"  full FT {best['full']:.0f} tok/s, LoRA {best['lora']:.0f} tok/s, "
          f"LoRA/full {best['lora'] / best['full']:.2f}x")
    print(f"  GA step: ours {best['ours_ga']:.0f} tok/s, HF Trainer {best['trainer_ga']:.0f} tok/s, "
          f"ours/Trainer {best['ours_ga'] / best['trainer_ga']:.2f}x (goal >= 1.0x)")
    print(f"model h{args.rss_hidden} L8 ({n_big / 1e6:.1f}M params), NPO+KLR, peak RSS:")
    print(f"  full {rss['full']['peak_mb']:.0f} MB (+{delta['full']:.0f} over pre-run), "
          f"LoRA {rss['lora']['peak_mb']:.0f} MB (+{delta['lora']:.0f})")
    print(f"  LoRA/full: whole process {rss['lora']['peak_mb'] / rss['full']['peak_mb']:.2f}x, "
          f"above pre-run RSS {delta['lora'] / delta['full']:.2f}x (goal <= 0.4x)")
    print(json.dumps({"tok_s": results, "rss": rss}))


if __name__ == "__main__":
    main()
