"""How the strategies' defaults (unlearn/strategy.py) were chosen: unlearn the built-in target with each candidate and
log, per epoch, KnowMem-forget and utility (KnowMem-retain) at full precision and at the deployment quantizer,
beside the retrain model's KnowMem-forget. The aim of every strategy is the same: KnowMem-forget at the quantized
precision down to the retrain's level at the least loss of quantized utility.

    .venv/bin/python benchmarks/sweep_strategies.py --target runs/demo/models/target \\
        --retrain runs/demo/models/retrain --data runs/demo/data --deploy nf4 \\
        --specs '[{"method": "ga_gdr", "strategy": "sure:lr_factor=10"}, {"method": "ga_gdr", "strategy": "qat:nf4"}]'

An "lr" in a spec is the base learning rate: SURE multiplies it by its lr_factor (the label prints the lr used).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

from qrunlearn.config import ExperimentConfig
from qrunlearn.data.muse import load_corpus
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.quant import quantize_model
from qrunlearn.unlearn import UnlearnConfig, unlearn
from qrunlearn.unlearn.lora import merged_copy


def knowmem(model, tokenizer, corpus, quick: EvalConfig) -> tuple[float, float]:
    metrics = evaluate(model, tokenizer, corpus, quick, progress=False).metrics
    return metrics["knowmem_f"], metrics["knowmem_r"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--retrain")
    parser.add_argument("--data", required=True)
    parser.add_argument("--deploy", default="nf4", help="the quantizer every epoch is also evaluated at")
    parser.add_argument("--defaults", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--specs", required=True, help="JSON list of {method, strategy, ...UnlearnConfig overrides}")
    args = parser.parse_args()
    corpus = load_corpus(args.data)
    quick = EvalConfig(metrics=("knowmem_f", "knowmem_r"), batch_size=64, bootstrap=1, mia=False, answer_nll=False)
    if args.retrain:
        model, tokenizer = load_causal_lm(args.retrain, device="cpu")
        print(f"retrain: KnowMem-f / -r {'/'.join(f'{v:.1f}' for v in knowmem(model, tokenizer, corpus, quick))}")
    for spec in json.loads(args.specs):
        method, strategy = spec.pop("method"), spec.pop("strategy")
        grid = ExperimentConfig(methods=(method,), strategies=(strategy,), defaults=args.defaults)
        base = grid.unlearn_config(method, strategy)
        config = UnlearnConfig.model_validate({**base.model_dump(), **spec})
        rows: list[str] = []

        def hook(epoch, model, tokenizer, rows=rows):
            fp = knowmem(model, tokenizer, corpus, quick)
            plain = merged_copy(model) if hasattr(model, "disable_adapter") else copy.deepcopy(model)
            q = knowmem(quantize_model(plain, args.deploy), tokenizer, corpus, quick)
            rows.append(f"e{epoch}: {fp[0]:.1f}/{fp[1]:.1f} | {q[0]:.1f}/{q[1]:.1f}")
            return {"knowmem_f": fp[0]}

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            unlearn(args.target, corpus, config, out, epoch_hook=hook, progress=False)
        label = f"{method} {strategy} lr {config.effective_lr:g}" + "".join(
            f" {k} {v}" for k, v in spec.items() if k != "lr")
        print(f"{label:<44} fp KnowMem-f/-r | {args.deploy}: " + "  ".join(rows)
              + f"   ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
