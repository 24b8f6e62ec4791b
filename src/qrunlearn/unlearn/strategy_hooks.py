"""What each strategy adds to the recipe's step, at run time. The settings are `unlearn.strategy`'s records (light,
read at start-up); this module holds what they do with the model:

    QatHooks     quantization-aware unlearning: fake quantization installed once for the run (policy and frozen
                 reference), and per micro-batch its forward passes (a full-precision share, then the deployed one)
    SureHooks    SURE: the forget term's own gradient, accumulated over the step, and the optimizer step applied to
                 the rows most salient for it
    QuailHooks   QUAIL: the per-position logit hinge against the original model and its weighted term

`StrategyHooks` holds the parts a strategy has; each of its hooks does nothing (or the plain thing) for a part the
strategy lacks, so the recipe's step calls them all unconditionally:

    with hooks.installed(model, reference):           # once per run
        for each micro-batch:
            for share, precision, deployed in hooks.precision_passes():
                with precision:
                    loss = objectives(...) + hooks.quail_term(stats, counts)
                    hooks.add_forget_loss(loss.forget * scale)
                    backward(loss.total * scale)
        hooks.optimizer_step(optimizer)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from qrunlearn.quant.fake import FakeQuantSwitch, fake_quantized
from qrunlearn.unlearn import quail, saliency
from qrunlearn.unlearn.strategy import Qat, Quail, Strategy, Sure


class Deployable(Protocol):
    """What `StrategyHooks.installed` needs of the frozen reference: its own fake quantization for the run."""

    def fake_quantized(self, setting: Qat) -> contextlib.AbstractContextManager: ...


@dataclass(frozen=True)
class PrecisionPass:
    """One forward of a micro-batch: its share of the loss, the precision it runs at, and whether it is the deployed
    model's (whose loss terms are the ones reported)."""

    share: float
    precision: contextlib.AbstractContextManager
    deployed: bool


@dataclass
class QatHooks:
    """Quantization-aware unlearning (`strategy.Qat`): the block linears compute with Q(W) (LoRA: Q(W0 + s B A)),
    straight-through in the backward pass, from `installed` until the run ends."""

    setting: Qat
    switch: FakeQuantSwitch | None = None

    @contextlib.contextmanager
    def installed(self, model: nn.Module) -> Iterator[None]:
        with fake_quantized(model, self.setting.spec) as switch:
            self.switch = switch
            try:
                yield
            finally:
                self.switch = None

    def full_precision(self) -> contextlib.AbstractContextManager:
        return self.switch.full_precision() if self.switch is not None else contextlib.nullcontext()

    def precision_passes(self) -> list[PrecisionPass]:
        """One deployed pass, or with `mix` < 1 a full-precision pass first and then the deployed one."""
        if self.setting.mix >= 1.0:
            return [PrecisionPass(1.0, contextlib.nullcontext(), True)]
        return [PrecisionPass(1.0 - self.setting.mix, self.full_precision(), False),
                PrecisionPass(self.setting.mix, contextlib.nullcontext(), True)]


@dataclass
class SureHooks:
    """SURE (`strategy.Sure`): the saliency map is the gradient of the step's forget term alone; the optimizer then
    moves only the rows at or above the percentile of its row norms (`saliency.masked_step`)."""

    setting: Sure
    names: list[str]
    params: list[torch.Tensor]
    num_processes: int = 1
    forget_grads: list[torch.Tensor | None] | None = field(default=None, repr=False)

    def add_forget_loss(self, forget: torch.Tensor) -> None:
        """The forget term's own gradient, accumulated over the step's micro-batches (the graph is kept for the
        backward of the whole loss that follows)."""
        new = torch.autograd.grad(forget, self.params, retain_graph=True, allow_unused=True)
        if self.forget_grads is None:
            self.forget_grads = [g.detach().clone() if g is not None else None for g in new]
            return
        self.forget_grads = [a if b is None else (b.detach().clone() if a is None else a.add_(b))
                             for a, b in zip(self.forget_grads, new)]

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads, self.forget_grads = self.forget_grads, None
        if grads is None:  # the step had no forget term
            optimizer.step()
            return
        by_name = {}
        for name, grad in zip(self.names, grads):
            if grad is not None:
                if self.num_processes > 1:
                    torch.distributed.all_reduce(grad)
                by_name[name] = grad
        masks = saliency.row_saliency_masks(by_name, self.setting.percentile)
        for name, param in zip(self.names, self.params):
            masks.setdefault(name, torch.zeros(param.shape[0], dtype=torch.bool))
        saliency.masked_step(optimizer, dict(zip(self.names, self.params)), masks)


@dataclass(frozen=True)
class QuailHooks:
    """QUAIL (`strategy.Quail`): keep every forget position's logits `margin` away from the original model's."""

    setting: Quail
    margin: float

    def hinge(self, logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return quail.hinge_by_position(logits, ref_logits, labels, self.margin)

    def term(self, hinge: torch.Tensor, forget_tokens: float) -> torch.Tensor:
        """The hinge's mean over the global batch's forget tokens (unweighted: the loss adds `weight` times it)."""
        return hinge.sum() / forget_tokens


@dataclass
class StrategyHooks:
    """The run-time parts of one strategy; see the module docstring."""

    qat: QatHooks | None = None
    sure: SureHooks | None = None
    quail: QuailHooks | None = None

    @classmethod
    def build(cls, strategy: Strategy, names: list[str], params: list[torch.Tensor], num_processes: int,
              quail_margin: float | None) -> "StrategyHooks":
        """`names` / `params`: the trainable parameters (SURE selects their rows); `quail_margin`: QUAIL's margin,
        measured on the model before unlearning (needed when the strategy has QUAIL)."""
        quail_hooks = None
        if strategy.quail is not None:
            assert quail_margin is not None, "QUAIL's margin is measured before the hooks are built"
            quail_hooks = QuailHooks(strategy.quail, quail_margin)
        return cls(qat=QatHooks(strategy.qat) if strategy.qat is not None else None,
                   sure=SureHooks(strategy.sure, names, params, num_processes) if strategy.sure is not None else None,
                   quail=quail_hooks)

    # ---- the forward context ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, model: nn.Module, reference: Deployable) -> Iterator[None]:
        """For the whole run: under QAT the policy and its frozen reference compute with their quantized weights
        (the reference is the deployed original, Q(W0)). Run backward passes inside (checkpointing recomputes
        forwards); `full_precision()` gives the plain model back within."""
        if self.qat is None:
            yield
            return
        with self.qat.installed(model), reference.fake_quantized(self.qat.setting):
            yield

    def full_precision(self) -> contextlib.AbstractContextManager:
        """The policy's own forwards (for the epoch hook: what is measured is the model as saved)."""
        return self.qat.full_precision() if self.qat is not None else contextlib.nullcontext()

    def precision_passes(self) -> list[PrecisionPass]:
        return self.qat.precision_passes() if self.qat is not None else [
            PrecisionPass(1.0, contextlib.nullcontext(), True)]

    # ---- the loss and the update ------------------------------------------------------------------------------
    def add_forget_loss(self, forget: torch.Tensor | None) -> None:
        if self.sure is not None and forget is not None:
            self.sure.add_forget_loss(forget)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sure is not None:
            self.sure.optimizer_step(optimizer)
        else:
            optimizer.step()

    def discard_step(self) -> None:
        """A step whose loss was not finite applies nothing: drop what SURE gathered for it."""
        if self.sure is not None:
            self.sure.forget_grads = None
