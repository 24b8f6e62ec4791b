"""The relearning probe: does a little fine-tuning on related text bring forgotten knowledge back?

Unlearning that hides knowledge instead of removing it comes back after a few steps of fine-tuning on *other*
documents about the same domain (Deeb and Roger, arXiv 2410.08827; Hu et al., "jogging the memory" of unlearned
models). The probe:

1. splits the forget set by subject, where the corpus says which (the KnowMem QA's optional `subject`, given by the
   built-in corpus): half the subjects are relearned, the other half probed. The relearning documents are the forget
   documents that name a relearned subject and no probed one, so no probed subject's text is ever trained on. A corpus
   without subjects falls back to half of the forget documents (seeded) and probes every forget question: then the
   probe also measures direct relearning, and says so (`by_subject` False);
2. fine-tunes a model for `steps` optimizer steps on the relearning documents (AdamW, constant lr);
3. asks the probed questions before and after.

Recovery has the same definition (and code) as reversion, with "relearned" in the place of "quantized": the share of
the forgetting of the probed questions that the relearning gives back, 1 - effect_after / effect_before, each effect
d * (m(U) - m(T)) on the probed questions (`eval.effect.precision_effect`). The retrain model, relearned the same way,
is the baseline: what the same steps teach a model that never saw the data.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

from qrunlearn.data.muse import MuseCorpus, QAPair
from qrunlearn.errors import UserError
from qrunlearn.models.train import TrainConfig, TrainResult, train_causal_lm


@dataclass(frozen=True)
class RelearnSplit:
    relearn_documents: list[str]
    probe_questions: list[QAPair]
    by_subject: bool  # False: the fallback (half of the documents, every question): not disjoint by subject
    relearn_subjects: list[str] = field(default_factory=list)
    probe_subjects: list[str] = field(default_factory=list)


def relearning_split(corpus: MuseCorpus, seed: int = 0) -> RelearnSplit:
    """Half the forget subjects relearned, the other half probed (see the module docstring)."""
    questions = corpus.require_knowmem("forget_qa")
    documents = [d for d in corpus.require_raw("forget") if d.strip()]
    subjects = sorted({q.subject for q in questions if q.subject is not None})
    rng = random.Random(seed)
    if len(subjects) >= 2 and all(q.subject is not None for q in questions):
        rng.shuffle(subjects)
        relearned, probed = sorted(subjects[:len(subjects) // 2]), sorted(subjects[len(subjects) // 2:])
        chosen = [d for d in documents if any(s in d for s in relearned) and not any(s in d for s in probed)]
        if not chosen:
            raise UserError(f"{corpus.root / 'raw' / 'forget'}: no forget document names a relearned subject "
                            f"without naming a probed one; the relearning probe has nothing to train on")
        return RelearnSplit(chosen, [q for q in questions if q.subject in probed], True, relearned, probed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    half = sorted(order[:max(1, len(order) // 2)])
    return RelearnSplit([documents[i] for i in half], list(questions), False)


def probe_corpus(corpus: MuseCorpus, split: RelearnSplit) -> MuseCorpus:
    """The corpus with KnowMem-forget asking only the probed questions (the few-shot examples unchanged)."""
    probed = copy.copy(corpus)
    probed.knowmem = {**corpus.knowmem, "forget_qa": list(split.probe_questions)}
    return probed


def relearn(model, tokenizer, split: RelearnSplit, steps: int, lr: float = 1e-5, batch_size: int = 4,
            max_length: int = 256, seed: int = 0) -> TrainResult:
    """Fine-tune `model` in place for `steps` optimizer steps (cycling the relearning documents; constant lr)."""
    if steps < 1:
        raise UserError(f"--relearn {steps}: give a positive number of steps")
    per_epoch = max(1, -(-len(split.relearn_documents) // batch_size))
    config = TrainConfig(epochs=-(-steps // per_epoch), batch_size=batch_size, lr=lr, schedule="constant",
                         warmup_fraction=0.0, max_length=max_length, seed=seed, max_steps=steps)
    return train_causal_lm(model, tokenizer, split.relearn_documents, config, desc="relearn", progress=False)
