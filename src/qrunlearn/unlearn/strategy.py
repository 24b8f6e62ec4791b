"""Strategies against "quantization undoes unlearning", as one axis of the grid: a strategy is a short name that
sets a few `UnlearnConfig` fields, so every strategy runs through the same recipe.

Grammar: tokens joined by "+": `full` or `lora` (the weights that move; `full` when neither is given), then any
of `sure` (SURE: salient rows only, large lr), `quail[:SPEC]` (QUAIL's logit hinge, margin from SPEC, default
nf4), `qat:SPEC` (losses on the fake-quantized model). Examples: full, lora, sure, quail, qat:nf4, lora+qat:nf4,
quail:rtn:w4g64.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from qrunlearn.errors import UserError
from qrunlearn.unlearn.config import Adapter, DefaultsName, Method

STRATEGY_HELP = "full | lora | sure | quail[:SPEC] | qat:SPEC, joined with + (e.g. lora+qat:nf4)"

# Settings of each modifier. SURE updates 5% of rows at a multiple of full fine-tuning's learning rate: 10x in their
# paper's regime ("paper"); on the built-in tiny model benchmarks/sweep_strategies.py (KnowMem-forget / utility at
# fp after each epoch, RESULTS.md) chose 3x: 1x moved nothing (GA+GDR 90 -> 91.4 in 4 epochs), 10x collapsed utility
# (GA+GDR 0.0 / 9.9 after epoch 2, NPO+GDR 8.7 / 4.5 after epoch 1), 3x reached NPO+GDR 5.0 / 84.3 (epoch 3) and
# GA+GDR 31.9 / 84.3 (epoch 3). QUAIL's hinge gets weight 1 against the forget loss (the same sweep: weights 0.3-10
# end within 4 KnowMem points of each other). Quantization-aware runs keep their adapter's learning rate and the
# pure quantized loss (3x the lr over-unlearned GA; an fp/quantized mix of 0.5 ended within 2.5 points, 1.5x slower).
SURE_PERCENTILE = 95.0
SURE_LR_FACTOR: dict[DefaultsName, float] = {"tiny": 3.0, "paper": 10.0}
QUAIL_WEIGHT = 1.0


class Strategy(BaseModel):
    name: str
    adapter: Adapter = "full"
    sure: bool = False
    quail_spec: str | None = None
    qat: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")


def parse_strategy(text: str) -> Strategy:
    strategy = Strategy(name=text)
    seen: set[str] = set()
    for token in text.split("+"):
        head, _, spec = token.strip().partition(":")
        if head in seen or head not in ("full", "lora", "sure", "quail", "qat"):
            raise UserError(f"strategy '{text}': '{token}' is not one of {STRATEGY_HELP}")
        seen.add(head)
        if head in ("full", "lora") and spec:
            raise UserError(f"strategy '{text}': '{head}' takes no spec")
        if head == "qat" and not spec:
            raise UserError(f"strategy '{text}': qat needs the deployment spec, e.g. qat:nf4")
        if head in ("full", "lora"):
            strategy.adapter = head  # type: ignore[assignment]
        elif head == "sure":
            strategy.sure = True
        elif head == "quail":
            strategy.quail_spec = spec or "nf4"
        else:
            strategy.qat = spec
    if {"full", "lora"} <= seen:
        raise UserError(f"strategy '{text}': choose full or lora, not both")
    if strategy.sure and strategy.adapter == "lora":
        raise UserError(f"strategy '{text}': SURE selects rows of the full weights; it does not combine with lora")
    return strategy


def strategy_settings(strategy: Strategy, defaults: DefaultsName, method: Method, base_lr: float) -> dict[str, Any]:
    """The `UnlearnConfig` fields the strategy sets on top of its adapter's default set."""
    settings: dict[str, Any] = {}
    if strategy.sure:
        settings.update(sure_percentile=SURE_PERCENTILE, lr=base_lr * SURE_LR_FACTOR[defaults])
    if strategy.quail_spec is not None:
        settings.update(quail_weight=QUAIL_WEIGHT, quail_spec=strategy.quail_spec)
    if strategy.qat is not None:
        settings.update(qat=strategy.qat)
    return settings
