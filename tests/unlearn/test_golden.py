"""Pinned numbers: the step losses of a short run of every method and strategy on the tiny model, against values
recorded in `golden_losses.json` (relative tolerance 1e-4, as torchtune pins its recipes' losses). A change to an
objective, a strategy's hook, the data order or the optimizer shows here as a number, not as "the loss fell".

Regenerate after an intended change (and say why in the commit):

    QRUNLEARN_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/unlearn/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from qrunlearn.unlearn import UnlearnConfig, unlearn

GOLDEN = Path(__file__).with_name("golden_losses.json")
WRITE = os.environ.get("QRUNLEARN_WRITE_GOLDEN") == "1"
CASES = [(method, reg, strategy) for method, reg in (("ga", "gdr"), ("ga", "klr"), ("npo", "gdr"), ("npo", "klr"),
                                                      ("simnpo", "gdr"), ("wga", "gdr"), ("satimp", "gdr"),
                                                      ("undial", "klr"), ("idkdpo", "gdr"), ("rmu", "act"))
         for strategy in ("full", "lora")]
CASES += [("ga", "gdr", "sure"), ("ga", "gdr", "quail:rtn:w4g64"), ("ga", "gdr", "qat:rtn:w4g64"),
          ("npo", "klr", "qat:nf4"), ("ga", "gdr", "lora+qat:rtn:w4g64:mix=0.5")]


def _config(method: str, reg: str, strategy: str, **changes) -> UnlearnConfig:
    settings = dict(method=method, reg=reg, strategy=strategy, lr=1e-3 if "lora" not in strategy else 1e-2,
                    epochs=1, batch_size=8, grad_accum=1, max_length=128, alpha=1.0, lora_r=4, lora_alpha=8.0,
                    seed=0)
    return UnlearnConfig(**{**settings, **changes})


def _steps(result) -> list[list[float]]:
    return [[step.loss, step.forget, step.retain, step.quail or 0.0] for step in result.losses]


@pytest.fixture(scope="module")
def golden() -> dict[str, list[list[float]]]:
    return {} if WRITE else json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def written():
    values: dict[str, list[list[float]]] = {}
    yield values
    if WRITE:
        previous = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**previous, **values}, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("method,reg,strategy", CASES, ids=[f"{m}_{r}-{s}" for m, r, s in CASES])
def test_step_losses_match_the_pinned_values(method, reg, strategy, tiny_model_dir, tiny_corpus, tmp_path, golden,
                                             written):
    result = unlearn(tiny_model_dir, tiny_corpus, _config(method, reg, strategy), tmp_path / "run", progress=False)
    key = f"{method}_{reg}-{strategy}"
    steps = _steps(result)
    assert len(steps) >= 2 and all(math.isfinite(v) for step in steps for v in step)
    if WRITE:
        written[key] = steps
        return
    assert key in golden, f"no pinned values for {key}: regenerate (see the module docstring)"
    pinned = golden[key]
    assert len(steps) == len(pinned)
    for number, (step, expected) in enumerate(zip(steps, pinned), start=1):
        assert step == pytest.approx(expected, rel=1e-4, abs=1e-6), f"step {number}: loss, forget, retain, quail"
