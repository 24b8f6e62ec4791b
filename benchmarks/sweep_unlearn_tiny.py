"""How `UnlearnConfig.tiny_defaults` were chosen: unlearn the built-in target with candidate settings and log,
per epoch, forget / retain QA exact match and answer NLL (zero-shot "Question: q\nAnswer:" prompts, the format
of the corpus' QA sheets), next to the retrain model's values.

    .venv/bin/qrunlearn data synth --out /tmp/u/data && .venv/bin/qrunlearn target --data /tmp/u/data --out /tmp/u/tgt
    .venv/bin/python benchmarks/sweep_unlearn_tiny.py --target /tmp/u/tgt/target --retrain /tmp/u/tgt/retrain \
        --data /tmp/u/data --specs '[{"method": "ga", "reg": "gdr", "adapter": "full", "lr": 1e-4}]'
"""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.no_grad()
def qa_scores(model, tokenizer, pairs, batch_size: int = 32) -> dict[str, float]:
    """Greedy exact match (generation starts with the answer) and mean per-token answer NLL."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits, nll_sum, nll_count = 0, 0.0, 0
    tokenizer.padding_side = "left"
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        prompts = [f"Question: {p.question}\nAnswer:" for p in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip().startswith(p.answer) for t, p in zip(texts, chunk))
        # teacher-forced answer NLL, one right-padded batch
        prompt_lens = [len(tokenizer(f"Question: {p.question}\nAnswer:").input_ids) for p in chunk]
        full = [tokenizer(f"Question: {p.question}\nAnswer: {p.answer}").input_ids for p in chunk]
        width = max(len(f) for f in full)
        ids = torch.full((len(full), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, f in enumerate(full):
            ids[row, :len(f)] = torch.tensor(f)
            mask[row, :len(f)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        token_nll = -logp[:, :-1].gather(-1, ids[:, 1:, None].to(device))[..., 0]
        for row, (f, n) in enumerate(zip(full, prompt_lens)):
            answer = token_nll[row, n - 1:len(f) - 1]
            nll_sum += float(answer.sum())
            nll_count += answer.numel()
    model.train(was_training)
    return {"em": hits / len(pairs), "nll": nll_sum / max(1, nll_count)}


def qa_hook(corpus):
    def hook(epoch, model, tokenizer):
        f = qa_scores(model, tokenizer, corpus.knowmem["forget_qa"])
        r = qa_scores(model, tokenizer, corpus.knowmem["retain_qa"])
        return {"forget_em": f["em"], "forget_nll": f["nll"], "retain_em": r["em"], "retain_nll": r["nll"]}
    return hook


def main() -> None:
    from qrunlearn.data.muse import load_corpus
    from qrunlearn.models.loading import load_causal_lm
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--retrain")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="/tmp/u/sweep")
    parser.add_argument("--specs", required=True, help="JSON list of {method, reg, adapter, ...overrides}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    corpus = load_corpus(args.data)
    hook = qa_hook(corpus)
    for name in ("target", "retrain"):
        path = getattr(args, name)
        if path:
            model, tok = load_causal_lm(path, dtype="float32", device="cpu")
            print(json.dumps({"name": name, **{k: round(v, 3) for k, v in hook(0, model, tok).items()}}), flush=True)
    for spec in json.loads(args.specs):
        spec = dict(spec)
        config = UnlearnConfig.tiny_defaults(spec.pop("method"), spec.pop("reg"), spec.pop("adapter"))
        config = config.model_copy(update=spec)
        name = f"{config.method}+{config.reg} {config.adapter} lr {config.lr:g} alpha {config.alpha:g}"
        start = time.time()
        result = unlearn(args.target, corpus, config, f"{args.out}/{name.replace(' ', '_')}", epoch_hook=hook,
                         progress=False, resume=False)
        rows = [{k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()} for m in result.epoch_metrics]
        print(json.dumps({"name": name, "wall_s": round(time.time() - start, 1),
                          "train_s": round(result.seconds, 1), "epochs": rows}), flush=True)


if __name__ == "__main__":
    main()
