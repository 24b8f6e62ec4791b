"""`qrunlearn target`: the built-in benchmark's target (forget + retain1) and retrain (retain1 only) models.

Both share one tokenizer trained on the whole corpus (so holdout names tokenise like the rest) and one recipe;
only the training documents differ. Each finished checkpoint records a cache key (a hash of the training text,
the config and the seed); a rerun with the same key reuses it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer

from qrunlearn.data.muse import MuseCorpus, load_corpus
from qrunlearn.io import atomic_directory, atomic_write_json, run_metadata, set_seed
from qrunlearn.models.tiny import (
    PRESETS,
    TrainConfig,
    build_model,
    train_causal_lm,
    train_tokenizer,
)

MARKER = "qrunlearn_model.json"
RECIPE_VERSION = 1  # bump when the training recipe changes so caches are invalidated

# Measured on the 'small' synth corpus (see README): 40 epochs at lr 2e-3 bring the training loss near zero
# and forget-QA exact match to ~1.0; fewer epochs leave facts half-learnt.
_DEFAULT_EPOCHS = {"tiny": 20, "small": 40}


@dataclass(frozen=True)
class TargetConfig:
    size: Literal["tiny", "small"] = "small"
    seed: int = 0
    epochs: int | None = None
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 256

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else _DEFAULT_EPOCHS[self.size]

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.resolved_epochs(), lr=self.lr, batch_size=self.batch_size,
                           max_length=self.max_length, seed=self.seed)


def _hash_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _tokenizer_texts(corpus: MuseCorpus) -> list[str]:
    texts = [t for docs in corpus.raw.values() for t in docs]
    texts += [t for docs in corpus.privleak.values() for t in docs]
    texts += [f"Question: {p.question}\nAnswer: {p.answer}" for pairs in corpus.knowmem.values() for p in pairs]
    return texts


def cache_key(docs: list[str], tokenizer_texts: list[str], config: TargetConfig) -> str:
    payload = json.dumps({"docs": _hash_texts(docs), "tok": _hash_texts(tokenizer_texts),
                          "config": asdict(config), "epochs": config.resolved_epochs(),
                          "recipe": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> bool:
    marker = path / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("cache_key") == key
    except json.JSONDecodeError:
        return False


def build_target_and_retrain(data_dir: Path | str, out: Path | str, config: TargetConfig = TargetConfig(),
                             force: bool = False, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or reuse) out/target and out/retrain; returns {name: {path, status, train}}."""
    corpus = load_corpus(data_dir)
    forget, retain = corpus.require_raw("forget"), corpus.require_raw("retain1")
    out = Path(out)
    preset = PRESETS[config.size]
    tok_texts = _tokenizer_texts(corpus)
    tok_dir = out / "tokenizer"
    tok_key = _hash_texts(tok_texts) + f"-{preset.vocab_target}"
    tok_marker = tok_dir / "qrunlearn_tokenizer.json"
    if force or not tok_marker.exists() or json.loads(tok_marker.read_text()).get("key") != tok_key:
        with atomic_directory(tok_dir) as tmp:
            train_tokenizer(tok_texts, preset.vocab_target, tmp)
            atomic_write_json(tmp / "qrunlearn_tokenizer.json", {"key": tok_key})
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))

    results: dict[str, dict[str, Any]] = {}
    for name, docs in (("target", forget + retain), ("retrain", retain)):
        path = out / name
        key = cache_key(docs, tok_texts, config)
        if not force and _cached(path, key):
            info = json.loads((path / MARKER).read_text())
            results[name] = {"path": path, "status": "cached", "train": info.get("train")}
            continue
        set_seed(config.seed)
        model = build_model(preset, len(tokenizer), tokenizer, seed=config.seed)
        started = time.perf_counter()
        train = train_causal_lm(model, tokenizer, docs, config.train_config(), desc=f"{name} ({len(docs)} docs)",
                                progress=progress)
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MARKER, {
                "cache_key": key, "role": name, "data": str(data_dir),
                "train_docs": len(docs), "n_params": sum(p.numel() for p in model.parameters()),
                "train": train.to_dict(), "wall_seconds": time.perf_counter() - started,
                **run_metadata(asdict(config), config.seed),
            })
        results[name] = {"path": path, "status": "trained", "train": train.to_dict()}
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results
