"""Causal attention speed: SDPA's CPU kernel (what transformers' "sdpa" runs) vs `models.attention`'s blocked oneDNN
products, side by side in one process, float32, inference. Prints GFLOP/s of the causal work (2 x 2 x T^2/2 x D per
query head and row) for both, their ratio, and the largest difference of the outputs.

    python benchmarks/bench_attention.py                 # SmolLM2-135M's heads (9 query / 3 key-value, 64 wide)
    python benchmarks/bench_attention.py --heads 32 --kv-heads 32 --head-dim 128   # Llama-2-7B's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peak import best_seconds  # noqa: E402  (benchmarks/peak.py, beside this script)

from qrunlearn.models.kernels.attention import BLOCK, blocked_causal_attention  # noqa: E402

# (rows, positions): one long privleak text, a batch of ~1k-token VerbMem prompts, and shorter batches.
SHAPES = ((1, 1850), (2, 1024), (4, 512), (8, 256), (16, 128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"heads {args.heads} / {args.kv_heads} x {args.head_dim}, {args.threads} thread(s), block {BLOCK}")
    print("| rows x positions | SDPA GFLOP/s | blocked GFLOP/s | blocked / SDPA | max difference |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    scaling = args.head_dim ** -0.5
    for rows, positions in SHAPES:
        # the layout transformers passes: (B, T, H, D) projections transposed to (B, H, T, D)
        query = torch.randn(rows, positions, args.heads, args.head_dim, generator=generator).transpose(1, 2)
        key = torch.randn(rows, positions, args.kv_heads, args.head_dim, generator=generator).transpose(1, 2)
        value = torch.randn(rows, positions, args.kv_heads, args.head_dim, generator=generator).transpose(1, 2)

        def sdpa(query: torch.Tensor = query, key: torch.Tensor = key, value: torch.Tensor = value) -> torch.Tensor:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=args.heads != args.kv_heads)
            return out.transpose(1, 2).contiguous()  # the (B, T, H, D) layout both return to transformers

        def blocked(query: torch.Tensor = query, key: torch.Tensor = key,
                    value: torch.Tensor = value) -> torch.Tensor:
            return blocked_causal_attention(query, key, value, scaling)

        with torch.inference_mode():
            difference = (sdpa() - blocked()).abs().max().item()
            sdpa_s, blocked_s = best_seconds(sdpa, args.repeats), best_seconds(blocked, args.repeats)
        flops = rows * args.heads * 2 * positions * positions * args.head_dim
        print(f"| {rows} x {positions} | {flops / sdpa_s / 1e9:.0f} | {flops / blocked_s / 1e9:.0f} "
              f"| {sdpa_s / blocked_s:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
