"""Evaluation speed: a one-prompt-at-a-time loop written like MUSE's reference code vs `qrunlearn.eval.muse`,
same model, same data, one process. Prints both wall times, their ratio, every metric side by side and the
largest difference (ROUGE metrics and PrivLeak in points, AUCs x100).

    python benchmarks/bench_eval.py                                   # built-in target on the synth 'small' corpus
    python benchmarks/bench_eval.py --data ../shared/data/muse-news --limit 20 --retrain-auc 0.4772

The baseline copies MUSE's loops (`model.generate` per prompt; a forward pass per privleak text whose token
log-probs are gathered with `.item()` in a Python loop; `np.sort` for Min-K%; sklearn's ROC), with two
changes so that both sides compute the same numbers: prompts longer than the model's context are cut the same
way (MUSE's 4k-context Llama never needed it), and MUSE's extra lower-cased pass over every privleak text
(its PPL/lower score, which we do not compute) is left out, which makes the baseline faster than MUSE's code
and the ratio conservative. Like MUSE (and like ours, which logs its NLL), the baseline scores privleak/retain
too.
Ours also computes what the baseline does not: bootstrap intervals and Min-K%++. Each metric runs ours then the baseline, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qrunlearn.data.muse import load_corpus  # noqa: E402
from qrunlearn.eval import EvalConfig, evaluate  # noqa: E402
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


# ---- driver -------------------------------------------------------------------------------------------------
def _default_model(data: Path) -> Path:
    from qrunlearn.models.target import TargetConfig, build_target_and_retrain

    out = REPO / "runs" / "bench_eval"
    return Path(build_target_and_retrain(data, out, TargetConfig(size="small"))["target"].path)


def main() -> None:
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
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = args.data
    if data is None:
        from qrunlearn.data.muse import write_corpus
        from qrunlearn.data.synth import SynthConfig, generate_corpus

        data = REPO / "runs" / "bench_eval" / "synth_small"
        if not (data / "privleak").exists():
            write_corpus(generate_corpus(SynthConfig(seed=0, size="small")), data)
    model_dir = args.model or _default_model(data)
    corpus = load_corpus(data)
    model, tokenizer = load_causal_lm(model_dir, dtype=args.dtype, device=args.device)
    print(f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {model.device}, "
          f"{args.dtype}), data {data}, limit {args.limit}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")

    # warm-up both code paths on one item so that neither pays first-call costs inside the timing
    evaluate(model, tokenizer, corpus, EvalConfig(limit=1, bootstrap=10), retrain_auc=args.retrain_auc,
             progress=False)
    for metric in METRICS:
        run_baseline(model, tokenizer, corpus, metric, 1, args.retrain_auc)

    # metric by metric, ours then the baseline, so that both see the same machine load
    ours_metrics, base_metrics, ours_timings, base_timings = {}, {}, {}, {}
    for metric in METRICS:
        start = time.perf_counter()
        result = evaluate(model, tokenizer, corpus, EvalConfig(metrics=(metric,), limit=args.limit,
                                                               batch_size=args.batch_size),
                          retrain_auc=args.retrain_auc, progress=False)
        ours_timings[metric] = time.perf_counter() - start
        ours_metrics.update(result.metrics)
        start = time.perf_counter()
        base_metrics.update(run_baseline(model, tokenizer, corpus, metric, args.limit, args.retrain_auc))
        base_timings[metric] = time.perf_counter() - start
        print(f"{metric}: baseline {base_timings[metric]:.2f}s, ours {ours_timings[metric]:.2f}s", flush=True)
    ours_time, base_time = sum(ours_timings.values()), sum(base_timings.values())

    print(f"\n{'metric':<16}{'baseline':>12}{'ours':>12}{'|diff|':>10}   (AUCs x100)")
    worst = 0.0
    for key, base in base_metrics.items():
        scale = 1.0 if key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak") else 100.0
        diff = abs(ours_metrics[key] - base) * scale
        worst = max(worst, diff)
        print(f"{key:<16}{base * scale:>12.3f}{ours_metrics[key] * scale:>12.3f}{diff:>10.4f}")
    print(f"\n{'time (s)':<16}{'baseline':>12}{'ours':>12}{'ratio':>10}")
    for key in METRICS:
        print(f"{key:<16}{base_timings[key]:>12.2f}{ours_timings[key]:>12.2f}"
              f"{base_timings[key] / ours_timings[key]:>10.1f}x")
    print(f"{'total':<16}{base_time:>12.2f}{ours_time:>12.2f}{base_time / ours_time:>10.1f}x")
    print(f"\nspeed-up {base_time / ours_time:.1f}x; largest metric difference {worst:.4f} points")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model": str(model_dir), "data": str(data), "limit": args.limit, "batch_size": args.batch_size,
            "device": str(model.device), "threads": torch.get_num_threads(), "baseline_seconds": base_time,
            "ours_seconds": ours_time, "speedup": base_time / ours_time, "max_metric_diff": worst,
            "baseline": base_metrics, "ours": ours_metrics, "baseline_timings": base_timings,
            "ours_timings": ours_timings,
        }, indent=2))


if __name__ == "__main__":
    main()
