"""Foundation measurements: benchmark build time, target/retrain training time and tokens/s, and what the two
models know — greedy exact-match on the KnowMem forget/retain questions and mean per-token NLL on the privleak
forget/retain/holdout texts.

    .venv/bin/python benchmarks/bench_target.py [--size small] [--seed 0] [--out runs/bench-target]

The target should know the forget facts (forget exact-match >= 0.8 is the aim) and the retrain should not
(near its holdout level).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from qrunlearn.data.muse import load_corpus, write_corpus
from qrunlearn.data.synth import SynthConfig, generate_corpus
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.eval.muse import exact_match
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.targets.build import MARKER, TargetConfig, build_target_and_retrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--model-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-target"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)

    started = time.perf_counter()
    write_corpus(generate_corpus(SynthConfig(seed=args.seed, size=args.size)), args.out / "data")
    synth_seconds = time.perf_counter() - started
    corpus = load_corpus(args.out / "data")

    build_target_and_retrain(args.out / "data", args.out / "models",
                             TargetConfig(size=args.model_size, seed=args.seed, epochs=args.epochs))
    print(f"threads: {torch.get_num_threads()}")
    print(f"benchmark build ({args.size}): {synth_seconds:.2f} s")
    config = EvalConfig(metrics=("knowmem_f", "knowmem_r", "privleak"), batch_size=32, bootstrap=200)
    summary: dict[str, object] = {"synth_seconds": synth_seconds}
    for name in ("target", "retrain"):
        marker = json.loads((args.out / "models" / name / MARKER).read_text())
        train = marker["train"]
        model, tokenizer = load_causal_lm(args.out / "models" / name, device="cpu")
        result = evaluate(model, tokenizer, corpus, config, progress=False)
        m = result.metrics
        row = {
            "params": marker["n_params"], "train_seconds": train["seconds"],
            "tokens_per_second": train["tokens_per_second"],
            "final_loss": train["epoch_losses"][-1], "epochs": len(train["epoch_losses"]),
            "em_forget": exact_match(result.items, "knowmem_f"), "em_retain": exact_match(result.items, "knowmem_r"),
            "knowmem_f": m["knowmem_f"], "knowmem_r": m["knowmem_r"], "privleak_auc": m["privleak_auc"],
            "nll_forget": m["nll_privleak_forget"], "nll_retain": m["nll_privleak_retain"],
            "nll_holdout": m["nll_privleak_holdout"],
        }
        summary[name] = row
        print(f"{name:8s} {row['params'] / 1e6:.2f}M params, {row['epochs']} epochs in {row['train_seconds']:.1f} s "
              f"({row['tokens_per_second']:.0f} tok/s), final loss {row['final_loss']:.3f}")
        print(f"         exact-match forget {row['em_forget']:.2f} retain {row['em_retain']:.2f}; "
              f"KnowMem-f {row['knowmem_f']:.1f} KnowMem-r {row['knowmem_r']:.1f}; "
              f"NLL forget {row['nll_forget']:.3f} retain {row['nll_retain']:.3f} holdout {row['nll_holdout']:.3f}; "
              f"Min-40% AUC {row['privleak_auc']:.3f}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
