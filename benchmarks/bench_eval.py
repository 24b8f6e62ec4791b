"""Evaluation speed: a one-prompt-at-a-time loop written like MUSE's reference code vs `qrunlearn.eval.muse`,
same model, same data, one process. Prints both wall times, their ratio, every metric side by side and the
largest difference (ROUGE metrics and PrivLeak in points, AUCs x100), then the model FLOP utilisation (MFU) of
each metric and of the VerbMem prefill.

    python benchmarks/bench_eval.py                                   # built-in target on the synth 'small' corpus
    python benchmarks/bench_eval.py --model ../main/models/smollm2 --data ../shared/data/muse-news --limit 8 \
        --retrain-auc 0.4772

The baseline copies MUSE's loops (`model.generate` per prompt; a forward pass per privleak text whose token
log-probs are gathered with `.item()` in a Python loop; `np.sort` for Min-K%; sklearn's ROC), with two
changes so that both sides compute the same numbers: prompts longer than the model's context are cut the same
way (MUSE's 4k-context Llama never needed it), and MUSE's extra lower-cased pass over every privleak text
(its PPL/lower score, which we do not compute) is left out, which makes the baseline faster than MUSE's code
and the ratio conservative. Like MUSE (and like ours, which logs its NLL), the baseline scores privleak/retain
too. It runs on stock PyTorch (MKL for float32 CPU matmuls), as MUSE's code would.
Ours also computes what the baseline does not: bootstrap intervals, Min-K%++ and the KnowMem answer NLL. Each
metric runs ours then the baseline, so both see the same machine load.

MFU = FLOPs the work needs (`qrunlearn.eval.flops`: tokens x block weights, the head where logits are needed,
causal attention; counted from ours' item logs) / (wall seconds x peak). The peak is measured in the same run: the
best of several 2048^3 float32 matmuls at the same thread count, through PyTorch's default BLAS and through oneDNN,
whichever is faster. "verbmem prefill" times the prefill of the VerbMem prompts alone (one new token each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from peak import matmul_peak  # noqa: E402  (benchmarks/peak.py, beside this script)

from qrunlearn.data.muse import load_corpus  # noqa: E402
from qrunlearn.eval import EvalConfig, evaluate  # noqa: E402
from qrunlearn.eval.flops import (  # noqa: E402
    ModelShape,
    causal_pairs,
    forward_flops,
    generation_flops,
    prefill_flops,
    scoring_flops,
)
from qrunlearn.eval.generation import (  # noqa: E402
    encode,
    eos_token_ids,
    greedy_generate,
    pad_token_id,
    shared_prefix_length,
)
from qrunlearn.models.kernels import kernels  # noqa: E402
from qrunlearn.models.loading import load_causal_lm  # noqa: E402

MIN_K_RATIOS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")


# ---- the baseline: MUSE's loops -----------------------------------------------------------------------------
def _context(model) -> int:
    return int(model.config.max_position_embeddings)


def _left_cut(input_ids: torch.Tensor, budget: int, bos_id) -> torch.Tensor:
    if input_ids.shape[1] <= budget:
        return input_ids
    if bos_id is not None and input_ids[0, 0].item() == bos_id:
        return torch.cat([input_ids[:, :1], input_ids[:, -(budget - 1):]], dim=1)
    return input_ids[:, -budget:]


def _generate_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    input_ids = _left_cut(input_ids, _context(model) - max_new_tokens, tokenizer.bos_token_id).to(model.device)
    output_ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    output_ids = output_ids[:, len(input_ids[0]):]
    return tokenizer.clean_up_tokenization(tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0])


def baseline_verbmem(model, tokenizer, items, max_new_tokens=128) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    scores = []
    for item in items:
        output = _generate_one(model, tokenizer, item.prompt, max_new_tokens)
        gt_ids = tokenizer(item.gt, return_tensors="pt", add_special_tokens=True).input_ids[:, :max_new_tokens]
        gt_short = tokenizer.clean_up_tokenization(tokenizer.batch_decode(gt_ids, skip_special_tokens=True)[0])
        scores.append(scorer.score(gt_short, output)["rougeL"].fmeasure)
    return float(np.mean(scores)) * 100


def get_prefix_before_words_occur(string: str, words: list[str]) -> str:
    for word in words:
        string = string.split(word)[0]
    return string


def baseline_knowmem(model, tokenizer, qa, icl, max_new_tokens=32) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    general_prompt = ""
    for pair in icl:
        general_prompt += f"Question: {pair.question}\nAnswer: {pair.answer}\n\n"
    scores = []
    for pair in qa:
        prompt = general_prompt + f"Question: {pair.question}\nAnswer: "
        output = _generate_one(model, tokenizer, prompt, max_new_tokens)
        output = get_prefix_before_words_occur(output, ["\n\n", "\nQuestion", "Question:"])
        scores.append(scorer.score(pair.answer, output)["rougeL"].fmeasure)
    return float(np.mean(scores)) * 100


def compute_ppl(text: str, model, tokenizer):
    input_ids = torch.tensor(tokenizer.encode(text)).unsqueeze(0)[:, :_context(model)].to(model.device)
    with torch.no_grad():
        outputs = model(input_ids, labels=input_ids)
    loss, logits = outputs[:2]
    probabilities = torch.nn.functional.log_softmax(logits.float(), dim=-1)
    all_prob = []
    input_ids_processed = input_ids[0][1:]
    for i, token_id in enumerate(input_ids_processed):
        all_prob.append(probabilities[0, i, token_id].item())
    return all_prob, loss.item(), input_ids


def inference(text: str, model, tokenizer) -> dict[str, float]:
    all_prob, p1_likelihood, input_ids = compute_ppl(text, model, tokenizer)
    if input_ids.shape[1] < len(tokenizer.encode(text)):  # truncated: zlib of the scored part, as ours
        text = tokenizer.decode(input_ids[0], skip_special_tokens=True)
    pred = {"PPL": float(p1_likelihood), "PPL/zlib": float(p1_likelihood / len(zlib.compress(bytes(text, "utf-8"))))}
    for ratio in MIN_K_RATIOS:
        k_length = int(len(all_prob) * ratio)
        topk_prob = np.sort(all_prob)[:k_length]
        pred[f"Min-{int(ratio * 100)}%"] = float(-np.mean(topk_prob).item())
    return pred


def baseline_privleak(model, tokenizer, forget, retain, holdout) -> dict[str, float]:
    from sklearn.metrics import auc as get_auc
    from sklearn.metrics import roc_curve

    # MUSE scores all three splits (and reports the AUC of every pair); PrivLeak reads forget vs holdout
    logs = {name: [inference(t, model, tokenizer) for t in texts] for name, texts in
            (("forget", forget), ("retain", retain), ("holdout", holdout))}
    aucs = {}
    for key in logs["forget"][0]:
        nonmember = [r[key] for r in logs["forget"]]
        member = [r[key] for r in logs["holdout"]]
        y = np.array([0] * len(nonmember) + [1] * len(member))
        fpr, tpr, _ = roc_curve(y, -np.array(nonmember + member))
        aucs[key] = get_auc(fpr, tpr)
    return aucs


def run_baseline(model, tokenizer, corpus, metric: str, limit, retrain_auc) -> dict[str, float]:
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    if metric == "verbmem_f":
        return {"verbmem_f": baseline_verbmem(model, tokenizer, cut(corpus.verbmem))}
    if metric in ("knowmem_f", "knowmem_r"):
        split = "forget" if metric == "knowmem_f" else "retain"
        return {metric: baseline_knowmem(model, tokenizer, cut(corpus.knowmem[f"{split}_qa"]),
                                         corpus.knowmem[f"{split}_qa_icl"])}
    aucs = baseline_privleak(model, tokenizer, cut(corpus.privleak["forget"]), cut(corpus.privleak["retain"]),
                             cut(corpus.privleak["holdout"]))
    metrics = {"privleak_auc": aucs["Min-40%"], "privleak": (aucs["Min-40%"] - retrain_auc) / retrain_auc * 100,
               "mia_loss": aucs["PPL"], "mia_zlib": aucs["PPL/zlib"]}
    for ratio in MIN_K_RATIOS:
        metrics[f"mia_min_k_{int(ratio * 100)}"] = aucs[f"Min-{int(ratio * 100)}%"]
    return metrics


# ---- FLOPs and the machine's peak ---------------------------------------------------------------------------
def _knowmem_flops(shape: ModelShape, tokenizer, items: list[dict], share_prefix: bool) -> int:
    """The shared few-shot prefix once, then each prompt's suffix and decoding, and each answer's NLL pass."""
    ids = encode(tokenizer, [item["prompt"] for item in items], None, keep="last").ids
    prefix = shared_prefix_length(ids) if share_prefix else 0
    total = forward_flops(shape, prefix, 0, causal_pairs(prefix))
    for item in items:
        total += generation_flops(shape, item["prompt_tokens"], item["new_tokens"], prefix)
        if "answer_tokens" in item:
            run = item["prompt_tokens"] + item["answer_tokens"] - prefix
            total += forward_flops(shape, run, item["answer_tokens"], causal_pairs(run, prefix))
    return total


def metric_flops(shape: ModelShape, tokenizer, metric: str, items: list[dict], share_prefix: bool = True) -> int:
    """FLOPs one metric needs, from ours' per-item logs (prompt and generated token counts, scored text lengths)."""
    rows = [item for item in items if item["metric"] == metric]
    if metric == "verbmem_f":
        return sum(generation_flops(shape, item["prompt_tokens"], item["new_tokens"]) for item in rows)
    if metric == "privleak":
        return sum(scoring_flops(shape, item["tokens"]) for item in rows)
    return _knowmem_flops(shape, tokenizer, rows, share_prefix)


def time_verbmem_prefill(model, tokenizer, corpus, limit, batch_size: int, config: EvalConfig) -> tuple[float, int]:
    """Wall seconds and FLOPs of the VerbMem prompts' prefill alone (one new token each), as `evaluate` runs it."""
    items = corpus.verbmem[:limit] if limit else corpus.verbmem
    ids = encode(tokenizer, [item.prompt for item in items], None, keep="last").ids
    eos = eos_token_ids(model, tokenizer)
    start = time.perf_counter()
    with kernels(model, config.cpu_kernels, inference=True):
        greedy_generate(model, ids, 1, pad_token_id(tokenizer, eos), eos, batch_size)
    seconds = time.perf_counter() - start
    return seconds, sum(prefill_flops(ModelShape.of(model), len(prompt)) for prompt in ids)


# ---- driver -------------------------------------------------------------------------------------------------
def _default_model(data: Path) -> Path:
    from qrunlearn.targets.build import TargetConfig, build_target_and_retrain

    out = REPO / "runs" / "bench_eval"
    return Path(build_target_and_retrain(data, out, TargetConfig(size="small"))["target"].path)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the built-in 'small' target, trained "
                                                   "and cached under runs/bench_eval)")
    parser.add_argument("--data", type=Path, help="corpus folder (default: synth 'small', seed 0)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--retrain-auc", type=float, default=0.5, help="PrivLeak reference (both sides use it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-cpu-kernels", action="store_true",
                        help="ours without the CPU kernels (EvalConfig.cpu_kernels: oneDNN linears, fused MLPs, "
                             "blocked attention); benchmarks/bench_attention.py times the attention kernel alone")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args()


def _corpus_dir(data: Path | None) -> Path:
    if data is not None:
        return data
    from qrunlearn.data.muse import write_corpus
    from qrunlearn.data.synth import SynthConfig, generate_corpus

    data = REPO / "runs" / "bench_eval" / "synth_small"
    if not (data / "privleak").exists():
        write_corpus(generate_corpus(SynthConfig(seed=0, size="small")), data)
    return data


def _ours(args: argparse.Namespace, **settings) -> EvalConfig:
    """Our evaluation's settings with the command line's fast-path switches."""
    return EvalConfig(cpu_kernels=not args.no_cpu_kernels, **settings)


def _side_by_side(model, tokenizer, corpus, args) -> dict:
    """Each metric, ours then the baseline; wall seconds, metric values and ours' FLOPs per metric."""
    shape = ModelShape.of(model)
    run: dict = {"ours": {}, "baseline": {}, "ours_s": {}, "baseline_s": {}, "flops": {}}
    for metric in args.metrics:
        config = _ours(args, metrics=(metric,), limit=args.limit, batch_size=args.batch_size)
        start = time.perf_counter()
        result = evaluate(model, tokenizer, corpus, config, retrain_auc=args.retrain_auc, progress=False)
        run["ours_s"][metric] = time.perf_counter() - start
        run["ours"].update(result.metrics)
        run["flops"][metric] = metric_flops(shape, tokenizer, metric, result.items, config.share_prefix)
        start = time.perf_counter()
        run["baseline"].update(run_baseline(model, tokenizer, corpus, metric, args.limit, args.retrain_auc))
        run["baseline_s"][metric] = time.perf_counter() - start
        print(f"{metric}: baseline {run['baseline_s'][metric]:.2f}s, ours {run['ours_s'][metric]:.2f}s", flush=True)
    return run


def _print_metrics(run: dict) -> float:
    print(f"\n{'metric':<16}{'baseline':>12}{'ours':>12}{'|diff|':>10}   (AUCs x100)")
    worst = 0.0
    for key, base in run["baseline"].items():
        scale = 1.0 if key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak") else 100.0
        diff = abs(run["ours"][key] - base) * scale
        worst = max(worst, diff)
        print(f"{key:<16}{base * scale:>12.3f}{run['ours'][key] * scale:>12.3f}{diff:>10.4f}")
    return worst


def _print_timings_and_mfu(run: dict, peak: float) -> None:
    rows = [(key, run["baseline_s"][key], run["ours_s"][key], run["flops"][key]) for key in run["ours_s"]]
    if run["prefill"]:
        rows.append(("verbmem prefill", None, run["prefill"]["seconds"], run["prefill"]["flops"]))
    print(f"\n{'time (s)':<16}{'baseline':>10}{'ours':>10}{'ratio':>8}{'GFLOP':>10}{'MFU base':>10}{'MFU ours':>10}")
    for key, base, ours, flops in rows:
        # the baseline does the same work as ours for VerbMem and PrivLeak only (KnowMem: no shared prefix, no early
        # stop, no answer NLL), so only there is its MFU on the same FLOPs meaningful
        same_work = base is not None and key in ("verbmem_f", "privleak")
        base_s = f"{base:>10.2f}" if base is not None else f"{'-':>10}"
        ratio = f"{base / ours:>7.2f}x" if base is not None else f"{'-':>8}"
        base_mfu = f"{flops / (base * peak * 1e9):>10.1%}" if same_work else f"{'-':>10}"
        ours_mfu = f"{flops / (ours * peak * 1e9):>10.1%}"
        print(f"{key:<16}{base_s}{ours:>10.2f}{ratio}{flops / 1e9:>10.0f}{base_mfu}{ours_mfu}")
    base_time, ours_time = sum(run["baseline_s"].values()), sum(run["ours_s"].values())
    print(f"{'total':<16}{base_time:>10.2f}{ours_time:>10.2f}{base_time / ours_time:>7.2f}x")


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _corpus_dir(args.data)
    model_dir = args.model or _default_model(data)
    corpus = load_corpus(data)
    model, tokenizer = load_causal_lm(model_dir, dtype=args.dtype, device=args.device)
    print(f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {model.device}, "
          f"{args.dtype}), data {data}, limit {args.limit}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    peaks = [matmul_peak()]

    # warm-up both code paths on one item so that neither pays first-call costs inside the timing
    evaluate(model, tokenizer, corpus, _ours(args, limit=1, bootstrap=10), retrain_auc=args.retrain_auc,
             progress=False)
    for metric in METRICS:
        run_baseline(model, tokenizer, corpus, metric, 1, args.retrain_auc)

    load_before = os.getloadavg()
    run = _side_by_side(model, tokenizer, corpus, args)
    run["prefill"] = {}
    if "verbmem_f" in args.metrics:
        seconds, flops = time_verbmem_prefill(model, tokenizer, corpus, args.limit, args.batch_size, _ours(args))
        run["prefill"] = {"seconds": seconds, "flops": flops}
    load_after = os.getloadavg()
    peaks.append(matmul_peak())
    peak = max(max(p.values()) for p in peaks)
    worst = _print_metrics(run)
    _print_timings_and_mfu(run, peak)
    print(f"\npeak {peak:.0f} GFLOP/s (2048^3 float32, {torch.get_num_threads()} threads, best of 5, before / after: "
          + ", ".join(f"default BLAS {p['default_blas']:.0f}, oneDNN {p['onednn']:.0f}" for p in peaks)
          + f"); load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    base_time, ours_time = sum(run["baseline_s"].values()), sum(run["ours_s"].values())
    print(f"speed-up {base_time / ours_time:.2f}x; largest metric difference {worst:.4f} points")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model": str(model_dir), "data": str(data), "limit": args.limit, "batch_size": args.batch_size,
            "device": str(model.device), "threads": torch.get_num_threads(), "baseline_seconds": base_time,
            "ours_seconds": ours_time, "speedup": base_time / ours_time, "max_metric_diff": worst,
            "baseline": run["baseline"], "ours": run["ours"], "baseline_timings": run["baseline_s"],
            "ours_timings": run["ours_s"], "flops": run["flops"], "verbmem_prefill": run["prefill"],
            "peaks_gflops": peaks, "peak_gflops": peak, "load_average": [load_before, load_after],
        }, indent=2))


if __name__ == "__main__":
    main()
