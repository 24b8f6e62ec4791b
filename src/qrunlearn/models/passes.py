"""Forward passes of similar-length sequences: how a batch is split so that short sequences are not padded to the
longest one (used by the target trainer and the unlearning recipe)."""

from __future__ import annotations

import math

# The fixed cost of one forward + backward pass in tokens of work, charged per pass when a batch's sequences are
# grouped by length. CPU: a choice, not swept (with it real / computed tokens went 0.54-0.57 -> 0.97 and the loops
# 1.2-1.9x faster: benchmarks/RESULTS.md "Training throughput"); CUDA: a kernel-launch-bound pass costs
# milliseconds, thousands of tokens of work on a large model (a guess, not measured here).
PASS_COST_TOKENS = {"cpu": 64, "cuda": 4096}


def pass_cost_for(device_type: str, setting: int | None) -> int:
    """The setting, or by device when it is None (devices other than the CPU get CUDA's)."""
    return setting if setting is not None else PASS_COST_TOKENS.get(device_type, PASS_COST_TOKENS["cuda"])


def length_groups(lengths: list[int], pass_cost: int) -> list[list[int]]:
    """Rows (positions into `lengths`) split into groups of similar length, one forward pass each, minimising the
    padded tokens computed plus `pass_cost` tokens per pass (the fixed cost of a forward and backward, in tokens of
    work). The rows are sorted by length and cut into contiguous runs; for this cost the best cut is found exactly
    (dynamic programming over the n + 1 cut points). Groups come shortest first, each in row order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0.0] + [math.inf] * len(order)  # best[k]: the cheapest split of the k shortest rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[order[end - 1]] + pass_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return groups[::-1]
