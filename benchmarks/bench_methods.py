"""Each unlearning method's cost per optimizer step relative to NPO, measured side by side in one run: seconds per
step, tokens/s and peak resident memory above the pre-run level, each method in a fresh subprocess (so one
method's peak does not hide another's), with the same model, corpus slice, batch and settings.

IdkDPO trains on question/answer pairs (a forget question with its answer and with a refusal: two short rows per
item), the others on MUSE's 128-token forget chunks, so its seconds per step compare different rows; tokens/s
counts the tokens each step really processes.

    .venv/bin/python benchmarks/bench_methods.py                      # a ~28M-param Llama built here
    .venv/bin/python benchmarks/bench_methods.py --model models/smollm2 --steps 4
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

METHODS = ["npo_gdr", "ga_gdr", "simnpo_gdr", "wga_gdr", "satimp_gdr", "undial_gdr", "idkdpo_gdr", "rmu_act"]
MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408)


def _child(model_dir: str, data_dir: str, method: str, adapter: str, steps: int, out: str) -> None:
    """One run in this fresh process; prints its timing and memory as JSON."""
    from qrunlearn.config import split_method
    from qrunlearn.data.muse import load_corpus
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    torch.set_num_threads(1)
    corpus = load_corpus(data_dir)
    batch = 4
    corpus.raw["forget"] = corpus.raw["forget"][:steps * batch]
    for name in ("forget_qa", "forget_qa_icl"):  # IdkDPO: as many items as the others' chunks
        corpus.knowmem[name] = corpus.knowmem.get(name, [])[:steps * batch]
    forget, reg = split_method(method)
    config = UnlearnConfig.tiny_defaults(forget, reg, adapter).model_copy(  # type: ignore[arg-type]
        update={"epochs": 1, "batch_size": batch, "grad_accum": 1, "max_length": 128})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = unlearn(model_dir, corpus, config, out, progress=False, resume=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "steps": len(result.losses), "seconds": result.seconds,
                      "tokens": result.tokens, "above_mb": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a h512 x 8-layer Llama built here, ~28M params)")
    parser.add_argument("--adapter", default="full", choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per method (batch 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest and the lowest peak")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--child", nargs=6, metavar=("MODEL", "DATA", "METHOD", "ADAPTER", "STEPS", "OUT"))
    args = parser.parse_args()
    if args.child:
        model, data, method, adapter, steps, out = args.child
        _child(model, data, method, adapter, int(steps), out)
        return

    from qrunlearn.data.muse import write_corpus
    from qrunlearn.data.synth import SynthConfig, generate_corpus
    from qrunlearn.models.tiny import ModelPreset, build_model, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    corpus = generate_corpus(SynthConfig(seed=0, size="small"))
    write_corpus(corpus, work / "data")
    model_dir = Path(args.model) if args.model else work / "model"
    if not args.model:
        texts = [t for docs in corpus.raw.values() for t in docs]
        tokenizer = train_tokenizer(texts, vocab_size=2048, out_dir=model_dir)
        build_model(ModelPreset(**MODEL), len(tokenizer), tokenizer, seed=0).save_pretrained(model_dir)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for repeat in range(args.repeats):  # interleaved: a shared machine's load hits every method alike
        for method in args.methods:
            proc = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(work / "data"), method,
                                   args.adapter, str(args.steps), str(work / f"run_{method}_{repeat}")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method}: {proc.stderr.strip().splitlines()[-1]}")
            runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = {m: {"per_step": min(r["seconds"] / r["steps"] for r in rs),
                "tokens_s": max(r["tokens"] / r["seconds"] for r in rs),
                "above_mb": min(r["above_mb"] for r in rs)} for m, rs in runs.items()}
    base = best.get("npo_gdr") or next(iter(best.values()))
    print(f"model {model_dir}, {args.adapter}, {args.steps} steps of batch 4 x <=128 tokens, one thread, "
          f"best of {args.repeats}")
    print("| method | s / step | vs NPO | tokens/s | vs NPO | peak RSS above pre-run (MB) | vs NPO |")
    print("|---|---|---|---|---|---|---|")
    for method, b in best.items():
        print(f"| {method} | {b['per_step']:.3f} | {b['per_step'] / base['per_step']:.2f}x | {b['tokens_s']:.0f} | "
              f"{b['tokens_s'] / base['tokens_s']:.2f}x | {b['above_mb']:.0f} | "
              f"{b['above_mb'] / base['above_mb']:.2f}x |")


if __name__ == "__main__":
    main()
