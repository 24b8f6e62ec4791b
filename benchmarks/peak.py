"""The machine's float32 matmul peak, the denominator of the benchmarks' model FLOP utilisation (MFU)."""

from __future__ import annotations

import time

import torch

from qrunlearn.models.onednn import onednn_linear


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of a size^3 float32 matmul at the current thread count, after one warm-up run,
    through PyTorch's default BLAS ("default_blas") and through oneDNN ("onednn", `models.onednn`; equal to the
    default where this build has no oneDNN linear)."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def best(run) -> float:
        run()
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - started)
        return 2 * size**3 / fastest / 1e9

    with torch.no_grad():
        default = best(lambda: a @ b)
        with onednn_linear():
            onednn = best(lambda: torch.nn.functional.linear(a, b))
    return {"default_blas": default, "onednn": onednn}
