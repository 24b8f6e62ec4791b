"""The machine's float32 matmul peak, the denominator of the benchmarks' model FLOP utilisation (MFU), and the
best-of-N wall-clock timer and resident-memory reading the benchmarks share."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch

from qrunlearn.models.kernels.onednn import onednn_linear


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` wall-clock runs of `run`, after one warm-up run."""
    run()
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of a size^3 float32 matmul at the current thread count, after one warm-up run,
    through PyTorch's default BLAS ("default_blas") and through oneDNN ("onednn", `models.onednn`; equal to the
    default where this build has no oneDNN linear)."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def best(run) -> float:
        return 2 * size**3 / best_seconds(run, repeats) / 1e9

    with torch.no_grad():
        default = best(lambda: a @ b)
        with onednn_linear():
            onednn = best(lambda: torch.nn.functional.linear(a, b))
    return {"default_blas": default, "onednn": onednn}
