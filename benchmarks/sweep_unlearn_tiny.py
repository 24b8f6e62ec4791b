"""How `UnlearnConfig.tiny_defaults` were chosen: unlearn the built-in target with candidate settings and log,
per epoch, MUSE's KnowMem on forget and on retain (the metrics the demo's table reports), beside the retrain
model's values.

    .venv/bin/python benchmarks/sweep_unlearn_tiny.py --target runs/demo/models/target \
        --retrain runs/demo/models/retrain --data runs/demo/data \
        --specs '[{"method": "ga", "reg": "gdr", "adapter": "full", "lr": 3e-4, "alpha": 5}]'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from qrunlearn.data.muse import load_corpus
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.unlearn import UnlearnConfig, unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--retrain")
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--specs", required=True, help="JSON list of {method, reg, adapter, ...overrides}")
    args = parser.parse_args()
    corpus = load_corpus(args.data)
    quick = EvalConfig(metrics=("knowmem_f", "knowmem_r"), batch_size=64, bootstrap=1, mia=False)
    if args.retrain:
        model, tokenizer = load_causal_lm(args.retrain, device="cpu")
        m = evaluate(model, tokenizer, corpus, quick, progress=False).metrics
        print(f"retrain: KnowMem-f {m['knowmem_f']:.1f}  KnowMem-r {m['knowmem_r']:.1f}")
    for spec in json.loads(args.specs):
        base = UnlearnConfig.tiny_defaults(spec.pop("method"), spec.pop("reg"), spec.pop("adapter"))
        config = base.model_copy(update={"epochs": args.epochs, **spec})
        rows: list[str] = []

        def hook(epoch, model, tokenizer, rows=rows):
            m = evaluate(model, tokenizer, corpus, quick, progress=False).metrics
            rows.append(f"e{epoch}: {m['knowmem_f']:.1f}/{m['knowmem_r']:.1f}")
            return {"knowmem_f": m["knowmem_f"]}

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            unlearn(args.target, corpus, config, out, epoch_hook=hook, progress=False)
        label = f"{config.method}+{config.reg} {config.adapter} lr {config.lr:g} alpha {config.alpha:g}" + "".join(
            f" {key} {value}" for key, value in spec.items() if key not in ("lr", "alpha", "epochs"))
        print(f"{label:<36} " + "  ".join(rows) + f"   ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
