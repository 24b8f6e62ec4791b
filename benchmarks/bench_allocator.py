"""An experiment, not a setting of qrunlearn: glibc's malloc as it comes vs serving every CPU tensor from its heap
(mallopt(M_MMAP_MAX, 0)), side by side: tokens/s and peak resident memory of the training loops.

As glibc comes, a request above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) gets a fresh
mapping that goes back to the system when freed, so the next tensor of that size lands on untouched pages that the
kernel faults in and zero-fills 4 KiB at a time; a training pass allocates and frees the same large tensors every
pass (SmolLM2's logits at 360 positions are 70 MB). From the heap a freed block is reused as it is, but the heap
fragments. RESULTS.md ("Host memory") has the numbers and why qrunlearn does not set it.

The setting is process-wide and cannot be undone, so every measurement runs in a fresh process; the two settings
alternate (A B A B ...) `--repeats` times so that a change in the machine's load hits both, and the best run of each
is kept (and the highest peak). Each process first runs one epoch of warm-up (oneDNN builds kernels for each new
shape; the heap grows to its working size), then the measured epochs. Loops: the target trainer and GA+GDR full
unlearning on the tiny 'small' Llama (`--epochs`), and with `--model` GA+GDR full unlearning of that model (one
epoch, 4 rows x 256 tokens, as `bench_throughput.py`). Peak memory is the process's peak resident size during the
loops (warm-up included) above its size before them.

    .venv/bin/python benchmarks/bench_allocator.py --data runs/strategies/data --threads 1
    .venv/bin/python benchmarks/bench_allocator.py --data runs/strategies/data \\
        --model runs/smollm2-prep/models/target --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile

SETTINGS = ("as it comes", "from the heap")
M_MMAP_MAX = -4  # glibc's malloc.h: how many mappings malloc may hold at once (0: none)
LOOPS = ("tiny trainer", "tiny unlearning GA+GDR", "model unlearning GA+GDR")


def _reset_peak() -> None:
    """The process's peak resident size (ru_maxrss) starts again from now: building the tokenizer and the model
    peaked higher than the tiny model's loops do (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def child(args: argparse.Namespace) -> None:
    """One loop in this process; prints tokens/s and the peak above the pre-loop resident size as JSON."""
    applied = False
    if args.setting == SETTINGS[1]:
        libc = ctypes.CDLL(None)
        applied = hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_MAX, 0) == 1  # 1: glibc took the value
    import torch
    from peak import resident_bytes  # benchmarks/peak.py, beside this script (imported after the setting)

    torch.set_num_threads(args.threads)
    from qrunlearn.data.muse import load_corpus
    from qrunlearn.models.tiny import PRESETS, build_model, train_tokenizer
    from qrunlearn.models.train import TrainConfig, train_causal_lm
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    corpus = load_corpus(args.data)
    docs = corpus.raw["forget"] + corpus.raw["retain1"]
    with tempfile.TemporaryDirectory() as folder:
        model_dir = args.model
        if args.loop != LOOPS[2]:
            tokenizer = train_tokenizer(docs, PRESETS["small"].vocab_target)
            torch.manual_seed(0)
            tiny = build_model(PRESETS["small"], len(tokenizer), tokenizer, seed=0)
            tiny.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            model_dir = folder
        baseline = resident_bytes()
        _reset_peak()
        if args.loop == LOOPS[0]:
            def run(epochs: int) -> float:
                config = TrainConfig(epochs=epochs, batch_size=8, max_length=256)
                return train_causal_lm(tiny, tokenizer, docs, config, progress=False).tokens_per_second
        else:
            base = UnlearnConfig.tiny_defaults("ga", "gdr", "full") if args.loop == LOOPS[1] else \
                UnlearnConfig.paper_defaults("ga", "gdr", "full").model_copy(update={
                    "batch_size": 4, "grad_accum": 1, "max_length": 256, "gradient_checkpointing": False,
                    "loss_chunk": 0})

            def run(epochs: int) -> float:
                with tempfile.TemporaryDirectory() as out:
                    result = unlearn(model_dir, corpus, base.model_copy(update={"epochs": epochs}), out,
                                     progress=False, resume=False)
                return result.tokens / result.seconds
        run(1)  # warm-up: oneDNN builds its kernels for each new shape, and the heap grows to its working size
        rate = run(args.epochs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"tokens_per_second": rate, "peak_bytes": peak, "applied": applied}))


def measure(args: argparse.Namespace, loop: str, setting: str) -> dict:
    command = [sys.executable, __file__, "--child", "--loop", loop, "--setting", setting, "--data", args.data,
               "--threads", str(args.threads), "--epochs", str(args.epochs if loop != LOOPS[2] else 1)]
    command += ["--model", args.model] if args.model else []
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a MUSE folder (the built-in benchmark's)")
    parser.add_argument("--model", help="also unlearning on this model (HF folder), e.g. SmolLM2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs, after one of warm-up")
    parser.add_argument("--only-model", action="store_true", help="with --model: skip the tiny model's loops")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--loop", choices=LOOPS)
    parser.add_argument("--setting", choices=SETTINGS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    loops = (LOOPS if args.model else LOOPS[:2]) if not args.only_model else LOOPS[2:]
    print(f"{args.threads} thread(s), best of {args.repeats} alternating runs per setting")
    print("| loop | tokens/s as it comes | tokens/s from the heap | speed-up | peak MiB as it comes | "
          "peak MiB from the heap | peak ratio |")
    print("|---|---|---|---|---|---|---|")
    for loop in loops:
        best = {setting: {"tokens_per_second": 0.0, "peak_bytes": 0} for setting in SETTINGS}
        for _ in range(args.repeats):
            for setting in SETTINGS:
                row = measure(args, loop, setting)
                if setting == SETTINGS[1] and not row["applied"]:
                    sys.exit("mallopt did not apply here (not glibc?): nothing to compare")
                best[setting]["tokens_per_second"] = max(best[setting]["tokens_per_second"], row["tokens_per_second"])
                best[setting]["peak_bytes"] = max(best[setting]["peak_bytes"], row["peak_bytes"])
        plain, heap = best[SETTINGS[0]], best[SETTINGS[1]]
        name = loop.replace("model", args.model) if args.model else loop
        speed, peak = (heap[key] / plain[key] for key in ("tokens_per_second", "peak_bytes"))
        print(f"| {name} | {plain['tokens_per_second']:.0f} | {heap['tokens_per_second']:.0f} | {speed:.2f}x | "
              f"{plain['peak_bytes'] / 2**20:.0f} | {heap['peak_bytes'] / 2**20:.0f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
