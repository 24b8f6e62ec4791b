"""Peak memory of unlearning runs, measured, beside `qrunlearn unlearn --estimate`'s prediction.

Each configuration runs in a fresh process: the resident set size is read after the imports (the baseline),
then one epoch of unlearning runs, and the peak (ru_maxrss) above the baseline is what the run itself used. On a
GPU the CUDA allocator's peak is reported instead. The estimate is computed for the same model, settings and
longest chunk.

    .venv/bin/python benchmarks/bench_memory.py --model runs/demo/models/target --data runs/demo/data
    .venv/bin/python benchmarks/bench_memory.py --model models/smollm2 --data runs/smollm2/data \\
        --batch-size 4 --max-length 256 --grid
    .venv/bin/python benchmarks/bench_memory.py --model runs/demo/models/target --data runs/demo/data --strategies

`--strategies` measures one epoch of NPO+KLR under each strategy of `unlearn/strategy.py` (the settings a grid cell
gets, tiny defaults, with `--batch-size` / `--max-length` and one padded pass per micro-batch, the shape the estimate
models) and prints the estimate, the measured peak and their ratio, and its tokens/s and peak relative to LoRA's.
`--only` picks strategies (comma-separated; LoRA is always measured, the reference of the relative columns):

    .venv/bin/python benchmarks/bench_memory.py --model runs/smollm2-seeds/models/target \\
        --data runs/smollm2-seeds/data --batch-size 4 --max-length 256 --forget-docs 8 --strategies
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1024**3


def child(args: argparse.Namespace) -> None:
    """One measured run (in its own process)."""
    import torch
    from peak import resident_bytes  # benchmarks/peak.py, beside this script

    from qrunlearn.data.muse import load_corpus
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    config = UnlearnConfig.model_validate(json.loads(args.config))
    corpus = load_corpus(args.data)
    if args.forget_docs:
        corpus.raw["forget"] = corpus.raw["forget"][: args.forget_docs]
        corpus.raw[config.retain_split] = corpus.raw[config.retain_split][: args.forget_docs]
    cuda = torch.cuda.is_available()
    baseline = resident_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = unlearn(args.model, corpus, config, out, progress=False, resume=False)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_above_baseline": peak - (0 if cuda else baseline), "seconds": seconds,
                      "tokens": result.tokens, "tokens_per_second": result.tokens / max(result.seconds, 1e-9)}))


def shape_of(model: str, corpus, config):
    """The micro-batch shape the estimate models; the model folder's tokenizer is required."""
    from qrunlearn.unlearn.memory import micro_batch_shape

    shape = micro_batch_shape(model, corpus, config)
    if shape is None:
        sys.exit(f"{model}: no tokenizer there to measure the micro-batch shape with")
    return shape


def wait_for_memory(gib: float) -> None:
    """On a shared machine: start the next measured run only once `gib` GiB are available (MemAvailable)."""
    while True:
        with open("/proc/meminfo") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
        if available >= gib * GIB:
            return
        time.sleep(10)


def measure(args: argparse.Namespace, config) -> dict:
    wait_for_memory(args.min_available)
    command = [sys.executable, __file__, "--child", "--model", args.model, "--data", args.data,
               "--config", config.model_dump_json(), "--forget-docs", str(args.forget_docs)]
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so the RSS peak would also count
    # memory the run had already released; a fixed 128 KiB threshold returns large tensors to the system on free
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{config.strategy.label}: the measured run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ONE_PASS = 10**9  # `pass_cost_tokens` that no padding outweighs
STRATEGIES = ("lora", "full", "sure", "quail", "qat:nf4", "lora+qat:nf4")


def compare_strategies(args: argparse.Namespace, corpus) -> None:
    from qrunlearn.config import ExperimentConfig
    from qrunlearn.unlearn.memory import estimate_memory

    strategies = tuple(args.only.split(",")) if args.only else STRATEGIES
    strategies = strategies if "lora" in strategies else ("lora", *strategies)
    grid = ExperimentConfig(methods=("npo_klr",), strategies=strategies, defaults="tiny")
    print("| strategy (NPO+KLR) | estimate GiB | measured GiB | estimate / measured | tokens/s | tokens/s vs LoRA | "
          "peak vs LoRA |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for strategy in strategies:
        config = grid.unlearn_config("npo_klr", strategy).model_copy(update={
            "epochs": 1, "batch_size": args.batch_size, "max_length": args.max_length, "pass_cost_tokens": ONE_PASS})
        shape = shape_of(args.model, corpus, config)
        estimate = estimate_memory(args.model, config, 1, shape.length, "cpu", rows=shape.rows).total
        row = rows[strategy] = {**measure(args, config), "estimate": estimate}
        lora = rows["lora"]  # measured first
        peak = row["peak_above_baseline"]
        print(f"| {strategy} | {estimate / GIB:.3f} | {peak / GIB:.3f} | {estimate / peak:.2f} | "
              f"{row['tokens_per_second']:.0f} | {row['tokens_per_second'] / lora['tokens_per_second']:.2f} | "
              f"{peak / lora['peak_above_baseline']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--forget-docs", type=int, default=0, help="use only the first N forget/retain documents")
    parser.add_argument("--grid", action="store_true", help="also checkpointing / chunked-loss variants")
    parser.add_argument("--loss-chunk", type=int, default=64, help="the chunked-loss variant's chunk (paper: 512)")
    parser.add_argument("--only-grid", action="store_true", help="with --grid: skip the plain variant")
    parser.add_argument("--strategies", action="store_true", help="each strategy: estimate vs measured, cost vs LoRA")
    parser.add_argument("--only", help="with --strategies: these strategies (comma-separated), e.g. sure,qat:nf4")
    parser.add_argument("--min-available", type=float, default=0.0,
                        help="start each measured run only once this many GiB are available (shared machines)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from qrunlearn.data.muse import load_corpus
    from qrunlearn.unlearn import UnlearnConfig
    from qrunlearn.unlearn.memory import estimate_memory

    corpus = load_corpus(args.data)
    if args.forget_docs:
        corpus.raw["forget"] = corpus.raw["forget"][: args.forget_docs]
        corpus.raw["retain1"] = corpus.raw["retain1"][: args.forget_docs]
    if args.strategies:
        compare_strategies(args, corpus)
        return
    variants: list[dict] = [] if args.only_grid else [{}]
    if args.grid:
        variants += [{"gradient_checkpointing": True}, {"gradient_checkpointing": True, "loss_chunk": args.loss_chunk}]
    peaks: dict[tuple, float] = {}
    print("| adapter | checkpointing | loss chunk | estimate GiB | measured GiB | estimate / measured | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        for adapter in ("full", "lora"):
            # one padded pass per micro-batch: the shape the estimate models (grouped passes are smaller)
            config = UnlearnConfig(method="npo", reg="klr", adapter=adapter, lr=1e-5, epochs=1,
                                   batch_size=args.batch_size, grad_accum=1, max_length=args.max_length, alpha=1.0,
                                   dtype="float32", pass_cost_tokens=ONE_PASS, **variant)
            shape = shape_of(args.model, corpus, config)
            estimate = estimate_memory(args.model, config, 1, shape.length, "cpu", rows=shape.rows).total
            measured = measure(args, config)
            peak = measured["peak_above_baseline"]
            peaks[(adapter, *variant.values())] = peak
            print(f"| {adapter} | {config.gradient_checkpointing} | {config.loss_chunk or '-'} | "
                  f"{estimate / GIB:.3f} | {peak / GIB:.3f} | {estimate / peak:.2f} | "
                  f"{measured['tokens_per_second']:.0f} |", flush=True)
    for variant in variants:
        key = tuple(variant.values())
        print(f"LoRA / full peak {variant or 'plain'}: {peaks[('lora', *key)] / peaks[('full', *key)]:.2f}")


if __name__ == "__main__":
    main()
