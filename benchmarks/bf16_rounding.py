"""How much of an optimizer step pure bf16 training keeps: the share of a model's block weights that a step of
+-lr leaves unchanged when weight and step are bf16 (the weight rounds back to itself). Full fine-tuning's Adam steps
are ~lr per weight, so this is the share of the update pure bf16 (`--precision pure`) throws away each step.

    .venv/bin/python benchmarks/bf16_rounding.py --model runs/smollm2/models/target --lr 1e-5 1e-4
"""

from __future__ import annotations

import argparse

import torch

from qrunlearn.models.layers import target_linear_names
from qrunlearn.models.loading import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4])
    args = parser.parse_args()
    model, _ = load_causal_lm(args.model, dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    total, unchanged = 0, dict.fromkeys(args.lr, 0)
    for name in target_linear_names(model):
        weight = model.get_submodule(name).weight.detach().to(torch.bfloat16)
        total += weight.numel()
        for lr in args.lr:
            signs = torch.randint(0, 2, weight.shape, generator=generator).to(torch.bfloat16) * 2 - 1
            unchanged[lr] += int((weight + signs * lr == weight).sum())
    print(f"{args.model}: {total:,} block weights")
    for lr, count in unchanged.items():
        print(f"  a +-{lr:g} step in pure bf16 leaves {count / total:.1%} of them unchanged")


if __name__ == "__main__":
    main()
