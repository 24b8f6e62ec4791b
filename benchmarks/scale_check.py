"""The paper's scale on one lent GPU, without downloading anything: Llama-2-7B's architecture with random weights,
unlearned with NPO+KLR as full fine-tuning and as LoRA at the paper's batch and length (activation checkpointing and
chunked losses on), merged, NF4-quantized and evaluated once; peak GPU memory and tokens/s beside what
`qrunlearn unlearn --estimate` predicts.

    python benchmarks/scale_check.py                       # on a GPU: Llama-2-7B's shape, bf16
    python benchmarks/scale_check.py --tiny --device cpu   # the same code path on a CPU, a 2-layer model

Random weights make the losses meaningless; what is measured is memory and speed. The corpus is the built-in
benchmark's text joined into documents long enough to fill the paper's 2,048-token chunks, tokenised with a small
tokenizer trained on it (ids fit any vocabulary). The weights are written once to --workdir (14 GB for 7B in bf16).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qrunlearn.data.muse import MuseCorpus, load_corpus, write_corpus
from qrunlearn.data.synth import SynthConfig, generate_corpus
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.models.tiny import train_tokenizer
from qrunlearn.quant import load_quantized
from qrunlearn.unlearn import UnlearnConfig, unlearn
from qrunlearn.unlearn.memory import estimate_memory

GIB = 1024**3
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=2048, max_position_embeddings=4096)


def long_corpus(folder: Path, documents: int, characters: int) -> MuseCorpus:
    """The built-in benchmark, its forget / retain1 articles joined into `documents` long documents each."""
    corpus = generate_corpus(SynthConfig(seed=0, size="medium"))
    for split in ("forget", "retain1"):
        text = " ".join(corpus.raw[split])
        while len(text) < documents * characters:
            text = f"{text} {text}"
        corpus.raw[split] = [text[i * characters:(i + 1) * characters] for i in range(documents)]
    write_corpus(corpus, folder)
    return load_corpus(folder)


def write_model(folder: Path, shape: dict, corpus: MuseCorpus, dtype: torch.dtype, device: str) -> float:
    started = time.perf_counter()
    tokenizer = train_tokenizer([t for docs in corpus.raw.values() for t in docs], 1024, folder)
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
        model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers types its wrapped `to` without self
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def measure(name: str, model_dir: Path, corpus: MuseCorpus, config: UnlearnConfig, device: str, out: Path) -> dict:
    estimate = estimate_memory(model_dir, config, 1, config.max_length, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = unlearn(model_dir, corpus, config, out / name, progress=False, resume=False)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row = {"run": name, "steps": len(result.losses), "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
           "train_seconds": result.seconds, "wall_seconds": wall, "estimate_gib": estimate.total / GIB,
           "peak_gib": peak / GIB if peak is not None else None, "model_dir": str(result.model_dir)}
    print(json.dumps(row), flush=True)
    print(estimate.describe(), flush=True)
    return row


def quantize_and_evaluate(model_dir: str, corpus: MuseCorpus, device: str) -> dict:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, tokenizer = load_quantized(model_dir, "nf4", device=device)
    quantize_seconds = time.perf_counter() - started
    started = time.perf_counter()
    config = EvalConfig(metrics=("knowmem_f", "privleak"), limit=16, batch_size=16, bootstrap=10)
    evaluate(model, tokenizer, corpus, config, progress=False)
    row = {"run": "nf4 quantize + evaluate", "quantize_seconds": quantize_seconds,
           "evaluate_seconds": time.perf_counter() - started,
           "peak_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 128 instead of 7B")
    parser.add_argument("--documents", type=int, default=24, help="forget (and retain) documents of ~2k tokens")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scale_check_"))
    shape = TINY if args.tiny else LLAMA2_7B
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    corpus = long_corpus(workdir / "data", args.documents, characters=9000)
    model_dir = workdir / "model"
    print(json.dumps({"write_model_seconds": write_model(model_dir, shape, corpus, dtype, args.device)}), flush=True)
    common = dict(method="npo", reg="klr", epochs=1, dtype="bfloat16" if args.device == "cuda" else "float32")
    rows = [
        # the paper's full fine-tuning: bf16 weights and AdamW state (its seed code trains a bf16 model)
        measure("npo_klr-full", model_dir, corpus, UnlearnConfig.paper_defaults("npo", "klr", "full").model_copy(
            update={**common, "precision": "pure"}), args.device, workdir),
        # LoRA: frozen bf16 base, fp32 adapters under bf16 autocast
        measure("npo_klr-lora", model_dir, corpus, UnlearnConfig.paper_defaults("npo", "klr", "lora").model_copy(
            update=common), args.device, workdir),
    ]
    rows.append(quantize_and_evaluate(rows[-1]["model_dir"], corpus, args.device))
    (workdir / "scale_check.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {workdir / 'scale_check.json'}")


if __name__ == "__main__":
    main()
