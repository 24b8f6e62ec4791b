"""llama.cpp against qrunlearn's own torch evaluation of the same model, side by side in one run.

Agreement (the route's end-to-end check): the model exported to an f32 GGUF and run by llama.cpp against the torch
model in float32 — per-token log-probs of every privleak text, greedy generations of every VerbMem / KnowMem item,
and each MUSE metric. Speed: the whole MUSE evaluation in torch and in llama.cpp (f32 and the quantized types), same
thread count, same process. Then the metrics of each llama.cpp type, for the record.

    make llamacpp
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_llamacpp.py --model runs/smollm2-full/models/target \
        --data runs/smollm2-full/data --types f32,q8_0,q4_k_m,q3_k_m --out runs/bench-llamacpp.json
Threads: torch's count (OMP_NUM_THREADS) for both runtimes; give only free cores (llama.cpp's workers spin).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from qrunlearn.data.muse import load_corpus
from qrunlearn.eval import EvalConfig
from qrunlearn.eval.generation import encode
from qrunlearn.eval.muse import evaluate
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.quant.gguf import open_quantized
from qrunlearn.quant.spec import parse_spec

HEADLINE = ("verbmem_f", "knowmem_f", "knowmem_r", "knowmem_f_answer_nll", "privleak_auc", "nll_privleak_forget",
            "nll_privleak_holdout")


def _logprob_agreement(model, loaded, tokenizer, texts: list[str], context: int) -> dict[str, float]:
    """Largest and mean |log p_llama.cpp - log p_torch| of each text's next tokens, over every position."""
    worst, total, count = 0.0, 0.0, 0
    for ids in encode(tokenizer, texts, context, keep="first").ids:
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        got = torch.log_softmax(loaded.logits(ids), -1)
        targets = torch.tensor(ids[1:])
        diff = (got[:-1].gather(1, targets[:, None]) - expected[:-1].gather(1, targets[:, None])).abs()
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    return {"max_abs_logprob_diff": worst, "mean_abs_logprob_diff": total / count, "tokens": count}


def _generation_agreement(torch_items: list[dict], gguf_items: list[dict]) -> dict[str, float]:
    out = {}
    for metric in ("verbmem_f", "knowmem_f", "knowmem_r"):
        a = [i for i in torch_items if i["metric"] == metric]
        b = [i for i in gguf_items if i["metric"] == metric]
        same = sum(x["generation"] == y["generation"] for x, y in zip(a, b))
        out[f"{metric}_same_generations"] = same / len(a) if a else float("nan")
        out[f"{metric}_items"] = len(a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--types", default="f32,q8_0,q4_k_m,q3_k_m")
    parser.add_argument("--out", default="runs/bench-llamacpp.json")
    args = parser.parse_args()
    corpus = load_corpus(args.data)
    config = EvalConfig(bootstrap=200, knowmem_prompt="answer-space")
    model, tokenizer = load_causal_lm(args.model, dtype="float32", device="cpu")
    threads = torch.get_num_threads()
    started = time.perf_counter()
    reference = evaluate(model, tokenizer, corpus, config, progress=False)
    torch_seconds = time.perf_counter() - started
    print(f"torch fp32: {torch_seconds:.1f} s ({threads} threads)")
    record: dict = {"model": args.model, "data": args.data, "threads": threads,
                    "torch": {"seconds": torch_seconds, "metrics": {k: reference.metrics.get(k) for k in HEADLINE}},
                    "llamacpp": {}}
    for name in args.types.split(","):
        spec = parse_spec(f"gguf:{name}")
        made = time.perf_counter()
        loaded, types = open_quantized(model, tokenizer, spec)
        make_seconds = time.perf_counter() - made
        started = time.perf_counter()
        result = evaluate(loaded, tokenizer, corpus, config, progress=False)
        seconds = time.perf_counter() - started
        metrics = {k: result.metrics.get(k) for k in HEADLINE}
        entry = {"types": types.model_dump(), "make_seconds": make_seconds, "seconds": seconds,
                 "speed_vs_torch": torch_seconds / seconds, "metrics": metrics,
                 "generations": _generation_agreement(reference.items, result.items)}
        if name == "f32":
            texts = [t for split in ("forget", "holdout") for t in corpus.require_privleak(split)]
            entry["logprobs"] = _logprob_agreement(model, loaded, tokenizer, texts, loaded.n_ctx)
            entry["metric_diff"] = {k: value - before for k in HEADLINE
                                    if (value := result.metrics.get(k)) is not None
                                    and (before := reference.metrics.get(k)) is not None}
        record["llamacpp"][name] = entry
        print(f"gguf:{name}: made in {make_seconds:.1f} s, evaluated in {seconds:.1f} s "
              f"(torch / llama.cpp = {torch_seconds / seconds:.2f}); {types.summary()}")
        print("   ", json.dumps({k: round(v, 4) for k, v in metrics.items() if v is not None}))
        print("   ", json.dumps(entry["generations"]))
        if "logprobs" in entry:
            print("    agreement:", json.dumps(entry["logprobs"]), json.dumps(entry["metric_diff"]))
        del loaded
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=lambda v: None if np.isnan(v) else v) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
