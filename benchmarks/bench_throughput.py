"""Training throughput and model FLOP utilisation (MFU) of the target trainer and of the unlearning loop, on the tiny
built-in Llama and (when given) a real model such as SmolLM2-135M.

MFU = 6 * N * trained tokens / s (+ 2 * N per token of a reference forward, for KLR) / the machine's fp32 matmul peak,
measured in the same run as the best of several 2048^3 fp32 GEMMs with the same thread count, through PyTorch's
default BLAS (MKL) and through oneDNN; the peak is the faster of the two. N counts every parameter that takes part in
a matmul (tied embeddings once, as the output head). Tokens exclude padding: padded positions are work the loop
wastes. Every loop runs with linears through the default BLAS and through oneDNN (`models.onednn`, the default on
CPU), and with each batch in one padded forward pass or its sequences grouped by length into several passes
(`pass_cost_tokens`, the default of both loops). The variants alternate `--repeats` times (A B A B ...) so
that a change in the machine's load hits them all; the best run of each is printed.

    .venv/bin/python benchmarks/bench_throughput.py --data runs/demo/data
    .venv/bin/python benchmarks/bench_throughput.py --data runs/smollm2/data --model models/smollm2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from typing import Any

import torch
from peak import matmul_peak  # benchmarks/peak.py, beside this script

from qrunlearn.data.muse import load_corpus
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.tiny import PRESETS, build_model, train_tokenizer
from qrunlearn.models.train import TrainConfig, train_causal_lm
from qrunlearn.unlearn import UnlearnConfig, unlearn


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding, unless it doubles as the output head."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if embedding.data_ptr() == head.data_ptr() else total - embedding.numel()


def kernels(onednn: bool) -> str:
    return "oneDNN" if onednn else "default BLAS"


def trainer_row(name: str, model, tokenizer, docs: list[str], config: TrainConfig, peak: float,
                rate: float) -> str:
    n = matmul_params(model)
    flops = 6 * n * rate
    return (f"| target trainer | {name} | {kernels(config.cpu_kernels)}, {passes(config.pass_cost_tokens)} | "
            f"{n / 1e6:.1f}M | {rate:.0f} | {flops / 1e9:.1f} | {flops / peak:.0%} |")


def trainer_rate(model, tokenizer, docs: list[str], config: TrainConfig) -> float:
    state = copy.deepcopy(model.state_dict())  # every run trains the same starting model
    result = train_causal_lm(model, tokenizer, docs, config, progress=False)
    model.load_state_dict(state)
    return result.tokens_per_second


def unlearn_rate(model_dir: str, corpus, config: UnlearnConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        result = unlearn(model_dir, corpus, config, out, progress=False, resume=False)
    return result.tokens / result.seconds


def alternating(measure, configs: tuple, repeats: int) -> list[float]:
    """Best rate of each config, the configs run in turn `repeats` times."""
    best = [0.0] * len(configs)
    for _ in range(repeats):
        for index, config in enumerate(configs):
            best[index] = max(best[index], measure(config))
    return best


def unlearn_row(name: str, config: UnlearnConfig, peak: float, n: int, rate: float) -> str:
    # every trained token costs a forward and a backward (6N); KLR's retain tokens also a reference forward (2N)
    reference_share = 0.5 if config.reg == "klr" else 0.0
    flops = (6 + 2 * reference_share) * n * rate
    label = f"{config.method}+{config.reg} {config.adapter}"
    return (f"| unlearning ({label}) | {name} | {kernels(config.cpu_kernels)}, {passes(config.pass_cost_tokens)} "
            f"| {n / 1e6:.1f}M | {rate:.0f} | {flops / 1e9:.1f} | {flops / peak:.0%} |")


ONE_PASS = 10**9  # a pass cost no padding outweighs: every batch padded to its longest chunk, as before
# the variants of each loop: (oneDNN linears, pass cost); "default" = the loop's default grouping by length
VARIANTS = ((False, ONE_PASS), (True, ONE_PASS), (True, "default"))


def passes(cost) -> str:
    return "one padded pass per batch" if cost == ONE_PASS else "passes grouped by length"


def trainer_configs(**settings: Any) -> tuple[TrainConfig, ...]:
    return tuple(TrainConfig(**settings, cpu_kernels=onednn, pass_cost_tokens=cost if isinstance(cost, int) else None)
                 for onednn, cost in VARIANTS)


def unlearn_configs(base: UnlearnConfig, **update) -> tuple[UnlearnConfig, ...]:
    return tuple(base.model_copy(update={**update, "cpu_kernels": onednn,
                                         "pass_cost_tokens": None if cost == "default" else cost})
                 for onednn, cost in VARIANTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a MUSE folder (the built-in benchmark's)")
    parser.add_argument("--model", help="also a real model (HF folder), e.g. models/smollm2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per kernel choice (tiny model)")
    parser.add_argument("--model-repeats", type=int, default=1, help="the same for --model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data)
    docs = corpus.raw["forget"] + corpus.raw["retain1"]
    peaks = matmul_peak()
    peak = max(peaks.values()) * 1e9
    print(f"fp32 2048^3 matmul, {args.threads} threads: default BLAS {peaks['default_blas']:.0f} GFLOP/s, oneDNN "
          f"{peaks['onednn']:.0f} GFLOP/s; MFU against the faster")
    print("| loop | model | linears | matmul params | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    tokenizer = train_tokenizer(docs, PRESETS["small"].vocab_target)
    torch.manual_seed(0)
    tiny = build_model(PRESETS["small"], len(tokenizer), tokenizer, seed=0)
    configs = trainer_configs(epochs=args.epochs, batch_size=8, max_length=256)
    rates = alternating(lambda c: trainer_rate(tiny, tokenizer, docs, c), configs, args.repeats)
    for config, rate in zip(configs, rates):
        print(trainer_row("tiny (small preset)", tiny, tokenizer, docs, config, peak, rate), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        tiny.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        n = matmul_params(tiny)
        for reg in ("gdr", "klr"):
            configs = unlearn_configs(UnlearnConfig.tiny_defaults("ga", reg, "full"), epochs=args.epochs)
            rates = alternating(lambda c: unlearn_rate(folder, corpus, c), configs, args.repeats)
            for config, rate in zip(configs, rates):
                print(unlearn_row("tiny (small preset)", config, peak, n, rate), flush=True)
    if args.model:
        model, tokenizer = load_causal_lm(args.model, dtype="float32", device="cpu")
        n = matmul_params(model)
        configs = trainer_configs(epochs=1, batch_size=8, max_length=256, group_by_length=True)
        rates = alternating(lambda c: trainer_rate(model, tokenizer, docs, c), configs, args.model_repeats)
        for config, rate in zip(configs, rates):
            print(trainer_row(args.model, model, tokenizer, docs, config, peak, rate), flush=True)
        del model
        for reg in ("gdr", "klr"):
            configs = unlearn_configs(UnlearnConfig.paper_defaults("ga", reg, "full"), epochs=1, batch_size=4,
                                      grad_accum=1, max_length=256, gradient_checkpointing=False, loss_chunk=0)
            rates = alternating(lambda c: unlearn_rate(args.model, corpus, c), configs, args.model_repeats)
            for config, rate in zip(configs, rates):
                print(unlearn_row(args.model, config, peak, n, rate), flush=True)


if __name__ == "__main__":
    main()
