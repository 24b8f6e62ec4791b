"""Quantization benchmark: time per method (quantize, forward, survival) and the code flip rate under a tiny
perturbation (w + 1e-5 * randn), on the built-in target's size (preset "small", 4.3M params) and a ~100M-param
random Llama. Everything is measured side by side in one process.

    .venv/bin/python benchmarks/bench_quant.py                    # CPU, both models
    .venv/bin/python benchmarks/bench_quant.py --skip-big         # small model only
Reference (SmolLM2-135M, trained weights): RTN w4 g64 0.065%, RTN w8 g64 0.43%, NF4 0.017% of codes flip.
Random-init weights (std 0.02) sit differently inside their bins than trained ones, so flip rates differ.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from qrunlearn.models.layers import target_linear_names
from qrunlearn.quant import available_methods, parse_spec, quantize_model, quantized_codes, survival_report

METHODS = ["rtn:w4g64", "rtn:w8g64", "nf4", "fp4", "int8", "hqq:w4g64"]


def build(hidden: int, layers: int, inter: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def forward_ms(model, ids, repeats: int = 3) -> float:
    """Median of `repeats` forwards after one warm-up (the first call selects kernels)."""
    with torch.no_grad():
        model(ids[:1, :8])
        times = sorted(timed(lambda: model(ids))[1] for _ in range(repeats))
    return times[len(times) // 2] * 1000


def perturbed(model, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name in target_linear_names(new):
            weight = new.get_submodule(name).weight
            weight.add_(scale * torch.randn(weight.shape, generator=gen).to(weight.device, weight.dtype))
    return new


def flip_rate(base_codes: dict, new_codes: dict) -> float:
    changed = sum(int((base_codes[k] != new_codes[k]).sum()) for k in base_codes)
    return changed / sum(v.numel() for v in base_codes.values())


def bench_model(label: str, model, methods: list[str], with_survival: bool, batch: int, seq: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, seq)).to(device)
    t_fp = forward_ms(model, ids)
    noisy = perturbed(model, 1e-5, seed=1)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"\n## {label}: {n_params / 1e6:.1f}M params on {device.type}, forward {batch}x{seq} {dtype} {t_fp:.0f} ms")
    header = "| method | quantize s | forward ms (x fp) | codes s | flip rate (w + 1e-5 randn) |"
    if with_survival:
        header += " survival s |"
    print(header)
    print("|---|---|---|---|---|" + ("---|" if with_survival else ""))
    for spec in methods:
        copy_ = copy.deepcopy(model)
        _, t_q = timed(lambda m=copy_, s=spec: quantize_model(m, s))
        t_f = forward_ms(copy_, ids)
        base_codes, t_c = timed(lambda s=spec: quantized_codes(model, s))
        new_codes = quantized_codes(noisy, spec)
        row = (f"| {parse_spec(spec).label} | {t_q:.2f} | {t_f:.0f} ({t_f / t_fp:.2f}x) | {t_c:.2f} | "
               f"{flip_rate(base_codes, new_codes) * 100:.3f}% |")
        if with_survival:
            unlearned = perturbed(model, 1e-3, seed=2)
            _, t_s = timed(lambda u=unlearned, s=spec: survival_report(model, u, s))
            row += f" {t_s:.2f} |"
        print(row, flush=True)
        del copy_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-big", action="store_true", help="only the 4.3M built-in target size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 models on both)")
    parser.add_argument("--big-methods", default=",".join(METHODS), help="methods for the ~100M model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if available_methods()[parse_spec(m).method]]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = torch.device(args.device)
    dtype = torch.float32  # also on CUDA: a 1e-5 perturbation is below bf16's resolution at |w| ~ 0.02
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, threads {args.threads}, load average {load:.1f}, device {where} "
          f"(CPU timings share the CPU with whatever else runs)")
    small = build(256, 4, 704, 2048, seed=0).to(device, dtype)  # the built-in target's size (preset "small")
    bench_model("built-in target size (h256 L4 I704, random init)", small, methods, with_survival=True,
                batch=8, seq=128)
    if not args.skip_big:
        big = build(768, 12, 2048, 8192, seed=0).to(device, dtype)
        big_methods = [m for m in args.big_methods.split(",") if m in methods]
        bench_model("~100M random Llama (h768 L12 I2048, vocab 8192)", big, big_methods, with_survival=False,
                    batch=4, seq=128)


if __name__ == "__main__":
    main()
