"""Fake-quantization overhead: forward+backward time of one training step with and without
`qrunlearn.quant.fake.fake_quantized`, full fine-tuning and LoRA (r 16, all block linears), on the "tiny" preset
(hidden 64, 2 layers) and a ~30M-parameter random Llama (hidden 512, 8 layers), measured side by side in one
process (the plain and fake-quantized steps alternate, so both see the same machine load). On CPU the times
are process CPU seconds on one thread (--threads), on CUDA wall seconds. Also times Q(W) alone for every block
weight, most of the extra cost (LoRA adds forming W0 + s B A per layer).

    .venv/bin/python benchmarks/bench_fake_quant.py                      # CPU, both models, rtn:w4g64 and nf4
    .venv/bin/python benchmarks/bench_fake_quant.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qrunlearn.models.layers import linear_weight, target_linear_names
from qrunlearn.quant.fake import fake_quantize, fake_quantized
from qrunlearn.unlearn.lora import wrap_lora

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2),
    "30M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8),
}


def build(size: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=2048, max_position_embeddings=512, tie_word_embeddings=False, **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # transformers types its wrapped `to` without self
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str) -> float:
    """Seconds of one call: CPU time of this process on CPU (wall time swings with whatever else runs on a shared
    machine; CPU time counts the work), wall time on CUDA."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    sync(device)
    start = clock()
    step()
    sync(device)
    return clock() - start


def training_step(model, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def compare(model, spec: str, ids: torch.Tensor, reps: int, device: str) -> tuple[float, float]:
    """Median seconds of a plain step and of a fake-quantized step (after one warm-up of each)."""
    plain, fake = [], []

    def fake_step() -> None:
        with fake_quantized(model, spec):
            training_step(model, ids)

    training_step(model, ids)
    fake_step()
    for _ in range(reps):
        plain.append(timed(lambda: training_step(model, ids), device))
        fake.append(timed(fake_step, device))
    return statistics.median(plain), statistics.median(fake)


def quantize_all_seconds(model, spec: str, reps: int, device: str) -> float:
    weights = [linear_weight(model.get_submodule(n)) for n in target_linear_names(model)]
    with torch.no_grad():
        return statistics.median(timed(lambda: [fake_quantize(w, spec) for w in weights], device)
                                 for _ in range(reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--specs", nargs="+", default=["rtn:w4g64", "nf4"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: idle OpenMP threads spin, which CPU time would count as work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(3, 2048, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    clock = "CPU seconds" if args.device == "cpu" else "wall seconds"
    print(f"device {args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens, median of {args.reps}, {clock}")
    header = ("model", "mode", "spec", "params", "plain", "fake", "ratio", "Q(W)")
    print(" ".join(f"{h:>10}" for h in header))
    for size in args.sizes:
        for mode in ("full", "lora"):
            model = build(size, dtype, args.device)
            if mode == "lora":
                model, _ = wrap_lora(model, r=16, alpha=16, dropout=0.0, targets=None)
            model.train()
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            for spec in args.specs:
                plain, fake = compare(model, spec, ids, args.reps, args.device)
                quant = quantize_all_seconds(model, spec, args.reps, args.device) if mode == "full" else float("nan")
                print(f"{size:>10} {mode:>10} {spec:>10} {n_params:9.1f}M {plain:10.4f} {fake:10.4f} "
                      f"{fake / plain:10.2f} {quant:10.4f}")


if __name__ == "__main__":
    main()
