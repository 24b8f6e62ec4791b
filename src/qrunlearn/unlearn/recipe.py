"""The unlearning recipe: GA / NPO / SimNPO / WGA / SatImp / UNDIAL / IdkDPO / RMU with a GDR / KLR retain term (RMU:
its own, `act`), full fine-tuning or LoRA, through
accelerate (`accelerate launch --num_processes N -m qrunlearn unlearn ...` runs DDP; FSDP / DeepSpeed configs pass
through to `Accelerator()`).

Read top to bottom, as `UnlearnRecipe.run` does:

    setup()          model, tokenizer, data, reference, LoRA adapters, optimizer, the strategy's hooks; resume
                     or reuse
    (the strategy's forward installed for the rest of the run: QAT's fake quantization)
    references()     NPO / IdkDPO: the reference NLLs of the forget chunks (cached with the run)
    train_epoch(e)   one pass over the forget set, one optimizer step per global batch
    end_epoch(e)     epoch hook (e.g. KnowMem), MUSE's selection rule, checkpoint
    save()           the model folder (LoRA: merged), the adapter, unlearn.json

Output layout of `out_dir`:

    model/             the model to evaluate / quantize (LoRA: merged with merge_and_unload), + unlearn.json
    adapter/           LoRA only: the adapter (peft format), + unlearn.json
    epochs/epoch_NNN/  per-epoch models when save_every_epoch (LoRA: merged)
    unlearn.json       settings, per-step and per-epoch losses, hook metrics, stop reason, provenance
    checkpoint/        resume state while the run is unfinished (removed when it finishes)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.io import run_metadata, set_seed
from qrunlearn.models.heads import hidden_states_forward
from qrunlearn.models.identity import model_identity
from qrunlearn.models.kernels import kernels
from qrunlearn.models.layers import block_output, transformer_blocks
from qrunlearn.models.loading import load_causal_lm, resolve_dtype, source_dtype
from qrunlearn.models.passes import pass_cost_for
from qrunlearn.models.train import collate
from qrunlearn.quant.fake import fake_quantized
from qrunlearn.quant.spec import QuantSpec
from qrunlearn.unlearn import objectives, quail, storage
from qrunlearn.unlearn.chunked import chunked_token_kl, chunked_token_nll
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.data import (
    MicroBatch,
    Step,
    UnlearnData,
    check_texts,
    epoch_schedule,
    load_unlearn_data,
    row_groups,
)
from qrunlearn.unlearn.lora import wrap_lora
from qrunlearn.unlearn.parallel import make_parallel, weights_dtype
from qrunlearn.unlearn.records import EpochRecord, Progress, RunRecord, StepLoss, UnlearnResult
from qrunlearn.unlearn.reference import Reference, cached_reference_nll
from qrunlearn.unlearn.select import select_epoch
from qrunlearn.unlearn.strategy import Quail
from qrunlearn.unlearn.strategy_hooks import StrategyHooks

EpochHook = Callable[[int, Any, Any], "dict[str, float] | None"]


@dataclass
class TokenStatistics:
    """Per-position statistics of one micro-batch (forget rows first), from which every loss is built."""

    forget_nll: torch.Tensor | None = None  # [n_forget, T-1], 0 on padding; None when the pass has no forget rows
    forget_mask: torch.Tensor | None = None
    retain_nll: torch.Tensor | None = None  # GDR
    retain_kl: torch.Tensor | None = None  # KLR
    retain_mask: torch.Tensor | None = None
    forget_hinge: torch.Tensor | None = None  # QUAIL: max(0, margin - ||z - z_ref||) per forget position
    forget_undial: torch.Tensor | None = None  # UNDIAL: cross-entropy to the adjusted reference, per position
    preferred_nll: torch.Tensor | None = None  # IdkDPO: the refusal rows' NLL, aligned with the forget rows
    preferred_mask: torch.Tensor | None = None
    forget_states: torch.Tensor | None = None  # RMU: its block's output on the forget rows [n, T, H]
    forget_attention: torch.Tensor | None = None
    retain_states: torch.Tensor | None = None  # RMU's retain term (act): the policy's and the reference's states
    ref_retain_states: torch.Tensor | None = None
    retain_attention: torch.Tensor | None = None


@dataclass
class MicroLoss:
    """One micro-batch's loss to backpropagate and its terms (forget, retain, QUAIL), each a global-batch mean."""

    total: torch.Tensor
    forget: torch.Tensor | None  # None when the pass has no forget rows
    retain: torch.Tensor | None
    quail: torch.Tensor | None
    log_ratio: float  # NPO: summed log pi_theta / pi_ref over the micro-batch's forget sequences


def run_fingerprint(model_path: str, data: UnlearnData, config: UnlearnConfig) -> str:
    """Identifies a run (input model, tokenised data, settings): only the same run resumes a checkpoint, is reused
    finished, or reads back NPO's reference NLLs. The model counts by content (`model_identity`), not by path: a
    target retrained into the same folder is a new run, and a moved or copied folder is still the same one."""
    digest = hashlib.sha256()
    digest.update(model_identity(model_path).encode())
    digest.update(config.model_dump_json().encode())
    rows: list[object] = [data.forget, data.retain]
    if data.preferred is not None:  # IdkDPO's rows: which answer is scored and the refusals
        rows += [data.forget_scored_from, data.preferred, data.preferred_scored_from]
    digest.update(json.dumps(rows).encode())
    return digest.hexdigest()[:16]


def unlearn(model_path: str | Path, corpus: MuseCorpus, config: UnlearnConfig, out_dir: str | Path,
            epoch_hook: EpochHook | None = None, progress: bool = True, resume: bool = True) -> UnlearnResult:
    """Unlearn `config.forget_split` of `corpus` from the model at `model_path`; write `out_dir` (see the
    module docstring) and return where the result is.

    `epoch_hook(epoch, model, tokenizer)` runs after each epoch on every process, with the model in eval mode
    (gradients off) in its current state: for LoRA that is the *peft model with adapters active, not merged*
    (its outputs equal the merged model's up to float rounding). Its returned dict is kept per epoch
    (`EpochRecord.metrics`); when `config.stop_knowmem_f` is set, its "knowmem_f" drives MUSE's selection (stop
    at the first epoch with knowmem_f <= stop_knowmem_f). The main process's dict is used on all processes.

    `resume`: continue from `out_dir/checkpoint` when it belongs to the same run, or return the recorded
    result when `out_dir` already holds this run finished. `resume=False` starts over."""
    return UnlearnRecipe(model_path, corpus, config, out_dir, epoch_hook, progress, resume).run()


class UnlearnRecipe:
    def __init__(self, model_path: str | Path, corpus: MuseCorpus, config: UnlearnConfig, out_dir: str | Path,
                 epoch_hook: EpochHook | None = None, progress: bool = True, resume: bool = True):
        if config.stop_knowmem_f is not None and epoch_hook is None:
            raise UserError("stop_knowmem_f (MUSE selection) needs an epoch hook that reports 'knowmem_f'")
        self.model_path, self.corpus, self.config = str(model_path), corpus, config
        self.out_dir, self.epoch_hook, self.show_progress, self.resume = Path(out_dir), epoch_hook, progress, resume
        self.parallel = make_parallel(config)

    def _kernels(self) -> contextlib.AbstractContextManager:
        """The CPU kernels around a training pass (`models.kernels`)."""
        return kernels(self.model, self.config.cpu_kernels, inference=False,
                       checkpointing=self.config.gradient_checkpointing)

    def run(self) -> UnlearnResult:
        finished = self.setup()
        if finished is not None:
            return finished
        with self.hooks.installed(self.unwrapped, self.reference):
            self.references()
            for epoch in range(self.state.epochs_done + 1, self.config.epochs + 1):
                losses = self.train_epoch(epoch)
                if losses is None or self.end_epoch(epoch, losses):
                    break
        self.bar.close()
        return self.save()

    # ---- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> UnlearnResult | None:
        """Everything training needs; returns the recorded result instead when `out_dir` holds this run
        finished (and resuming is allowed)."""
        config, parallel = self.config, self.parallel
        if parallel.is_main:
            storage.tidy(self.out_dir)
        parallel.wait()
        set_seed(config.seed)
        needs_retain, from_qa = config.reg != "none", config.trains_on_forget_qa
        check_texts(self.corpus, config.forget_split, config.retain_split, needs_retain, forget_from_qa=from_qa)
        model, self.tokenizer = load_causal_lm(self.model_path, dtype=weights_dtype(config, parallel.device),
                                               device=parallel.device)
        self.data = load_unlearn_data(self.corpus, self.tokenizer, config.forget_split, config.retain_split,
                                      needs_retain=needs_retain, max_length=config.max_length, forget_from_qa=from_qa)
        self.fingerprint = run_fingerprint(self.model_path, self.data, config)
        if self.resume:
            finished = self._finished_result()
            if finished is not None:
                return finished

        self.provenance = run_metadata(config.model_dump(mode="json"), config.seed)
        self.pad_id = self.tokenizer.pad_token_id
        strategy = config.strategy
        self.reference = Reference(config, model, parallel)
        if config.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rmu_layer = self._rmu_layer(model) if config.method == "rmu" else None
        self.lora_targets: list[str] | None = None
        if config.adapter == "lora":
            model, self.lora_targets = wrap_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                                 config.lora_targets)
        # AdamW with a constant learning rate (the paper's schedule); no scheduler object needed. Fused: one kernel
        # per tensor (5x faster than the default on SmolLM2's 135M parameters on a CPU thread); not for FSDP's
        # sharded DTensor parameters.
        self.model, self.optimizer = parallel.prepare(
            model, lambda params: torch.optim.AdamW(params, lr=config.effective_lr, weight_decay=config.weight_decay,
                                                    fused=not parallel.sharded))
        self.unwrapped = parallel.unwrap(self.model)
        named = [(name, p) for name, p in self.unwrapped.named_parameters() if p.requires_grad]
        self.trainable_names = [name for name, _ in named]
        self.trainable = [p for _, p in named]
        self.transformer = self.unwrapped.get_base_model() if config.adapter == "lora" else self.unwrapped
        self.state = self._resume_or_start()
        self.hooks = StrategyHooks.build(strategy, self.trainable_names, self.trainable, parallel.num_processes,
                                         self._quail_margin(strategy.quail) if strategy.quail is not None else None)
        self.ref_nll: torch.Tensor | None = None
        self.control = (objectives.control_vector(self.unwrapped.config.hidden_size, config.rmu_coefficient,
                                                  config.seed).to(parallel.device)
                        if config.method == "rmu" else None)
        self.bar = self._progress_bar()
        return None

    def _rmu_layer(self, model: torch.nn.Module) -> int:
        """RMU's block (config.rmu_layer, or 7/32 of the depth); with full fine-tuning and `rmu_params: paper`,
        only the MLP down-projections of that block and the two before it train (WMDP's choice)."""
        config, blocks = self.config, transformer_blocks(model)
        layer = config.rmu_layer if config.rmu_layer is not None else round(len(blocks) * 7 / 32)
        if layer >= len(blocks):
            raise UserError(f"--rmu-layer {layer}: the model has {len(blocks)} transformer blocks "
                            f"(0-{len(blocks) - 1})")
        if config.adapter == "full" and config.rmu_params == "paper":
            chosen = [p for index in range(max(0, layer - 2), layer + 1)
                      for name, p in blocks[index].named_parameters()
                      if name.endswith(("down_proj.weight", "mlp.c_proj.weight"))]
            if not chosen:
                raise UserError(f"--rmu-params paper: block {layer} has no MLP down-projection (down_proj or "
                                f"mlp.c_proj) to train; use --rmu-params all")
            for p in model.parameters():
                p.requires_grad_(False)
            for p in chosen:
                p.requires_grad_(True)
        return layer

    def _finished_result(self) -> UnlearnResult | None:
        record = storage.read_record(self.out_dir)
        if record is None:
            return None
        if record.status == "finished" and record.progress.fingerprint == self.fingerprint:
            if self.parallel.is_main:  # left when a kill came between the finished record and its removal
                storage.remove_checkpoint(self.out_dir)
            adapter = self.out_dir / "adapter"
            return UnlearnResult.from_progress(self.out_dir, record.progress, adapter if adapter.is_dir() else None,
                                               reused=True)
        if record.status == "finished":
            raise UserError(f"{self.out_dir / storage.RECORD_FILE}: {self.out_dir} holds a different run (other "
                            f"model, data or settings); choose another output folder or start over (--no-resume)")
        return None

    def _resume_or_start(self) -> Progress:
        saved = storage.load_progress(self.out_dir) if self.resume else None
        if saved is not None and saved.fingerprint == self.fingerprint:
            storage.restore_checkpoint(self.parallel, self.model, self.optimizer, self.out_dir)
            if self.show_progress and self.parallel.is_main:
                print(f"resuming {self.out_dir} after epoch {saved.epochs_done}")
            saved.resumed_after.append(saved.epochs_done)
            return saved
        if self.parallel.is_main:
            storage.clear_outputs(self.out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.parallel.wait()
        return Progress(fingerprint=self.fingerprint)

    def references(self) -> None:
        """NPO's reference NLL of each forget chunk; IdkDPO's [rejected answer, refusal] per question. Under QAT
        the reference is the deployed original, Q(W0): this runs inside the strategy's forward."""
        if self.config.uses_reference_nll:
            self.ref_nll = cached_reference_nll(self.out_dir, self.fingerprint, self._reference_nll, self.parallel)

    @torch.no_grad()
    def _reference_nll(self) -> torch.Tensor:
        """NLL_ref(x) summed over each forget chunk, in chunk order: the policy at step 0 (LoRA's adapters start at
        zero) run over exactly the micro-batches of the first epoch, so that the first step's forward is the same
        computation bit for bit and NPO's log-ratio starts at exactly 0, whatever the precision and kernels."""
        self.model.eval()
        refusals = self.config.trains_on_forget_qa  # IdkDPO: a second column, the refusals' NLLs
        columns = [[0.0] * len(self.data.forget) for _ in range(2 if refusals else 1)]
        for step in self._schedule(1):
            for micro in step.micro_batches:
                for group, weight in self._row_passes(*_share_of_process(micro, step)):
                    with self._kernels():  # the training step's kernels, so the first step's forward is this one
                        stats = self._statistics(group)  # every process runs as many forwards (sharded models)
                    if stats.forget_nll is None or stats.forget_mask is None:
                        continue
                    rows = [(stats.forget_nll, stats.forget_mask), (stats.preferred_nll, stats.preferred_mask)]
                    for column, (nll, mask) in zip(columns, rows):
                        assert nll is not None and mask is not None
                        for index, value in zip(group.forget, objectives.sequence_sums(nll, mask)[0].tolist()):
                            column[index] += weight * value
        self.model.train()
        sums = [torch.tensor(self.parallel.sum_over_processes(c), dtype=torch.float32) for c in columns]
        return sums[0] if len(sums) == 1 else torch.stack(sums, dim=1)

    def _schedule(self, epoch: int) -> list[Step]:
        return epoch_schedule(len(self.data.forget), len(self.data.retain), epoch, self.config.seed,
                              self.config.batch_size, self.config.grad_accum, self.parallel.process_index,
                              self.parallel.num_processes)

    def _progress_bar(self) -> tqdm:
        steps_per_epoch = len(self._schedule(0))
        return tqdm(total=steps_per_epoch * self.config.epochs, initial=steps_per_epoch * self.state.epochs_done,
                    desc="unlearn", disable=not (self.show_progress and self.parallel.is_main), dynamic_ncols=True)

    # ---- training ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> list[StepLoss] | None:
        """One pass over the forget set. Returns the epoch's step losses, or None when a loss was not finite
        (the model is then back at the last finished epoch: `_recover_from_non_finite`)."""
        started = time.perf_counter()
        self.model.train()
        losses: list[StepLoss] = []
        for index, step in enumerate(self._schedule(epoch), start=1):
            with self._kernels():
                loss = self._optimizer_step(epoch, index, step)
            if not math.isfinite(loss.loss):
                self._recover_from_non_finite(f"non-finite loss at epoch {epoch} step {index}")
                return None
            losses.append(loss)
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, forget=f"{loss.forget:.3f}", retain=f"{loss.retain:.3f}")
        self.state.seconds += time.perf_counter() - started
        return losses

    def _optimizer_step(self, epoch: int, index: int, step: Step) -> StepLoss:
        counts = _global_counts(step, self.data)
        sums = [0.0, 0.0, 0.0, 0.0]  # forget term, retain term, QUAIL term, summed NPO log-ratio
        row_passes = [p for micro in step.micro_batches for p in self._row_passes(*_share_of_process(micro, step))]
        for r, (group, weight) in enumerate(row_passes):
            passes = self.hooks.precision_passes()
            for p, precision_pass in enumerate(passes):
                # one gradient all-reduce per optimizer step, after its last backward
                sync = r == len(row_passes) - 1 and p == len(passes) - 1
                with precision_pass.precision, self.parallel.accumulating(self.model, sync=sync):
                    loss = self._micro_batch_loss(group, counts)
                    # gradients are averaged over processes; the losses are already global means.
                    scale = precision_pass.share * weight * self.parallel.num_processes
                    self.hooks.add_forget_loss(loss.forget * scale if loss.forget is not None else None)
                    self.parallel.backward(loss.total * scale)
                if precision_pass.deployed:  # the terms reported are the deployed model's (quantized under QAT)
                    terms = [loss.forget, loss.retain, loss.quail]
                    values = [float(t.detach()) if t is not None else 0.0 for t in terms] + [loss.log_ratio]
                    sums = [total + weight * value for total, value in zip(sums, values)]
        forget, retain, quail_term, log_ratio = self.parallel.sum_over_processes(sums)
        quail_setting = self.config.strategy.quail
        total = (self.config.gamma * forget + (self.config.alpha * retain if self.config.reg != "none" else 0.0)
                 + (quail_setting.weight * quail_term if quail_setting is not None else 0.0))
        if math.isfinite(total):
            if self.config.max_grad_norm > 0:
                self.parallel.clip_grad_norm(self.trainable, self.config.max_grad_norm)
            self.hooks.optimizer_step(self.optimizer)
            self.state.tokens += self._step_tokens(step)
        else:
            self.hooks.discard_step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepLoss(epoch=epoch, step=index, forget=forget, retain=retain, loss=total,
                        log_ratio=log_ratio / counts["forget_sequences"] if self.config.uses_reference_nll else None,
                        quail=quail_term if quail_setting is not None else None)

    def _row_passes(self, micro: MicroBatch, weight: float) -> list[tuple[MicroBatch, float]]:
        """The forward passes of one micro-batch, its chunks grouped by length (`data.row_groups`), with their
        weights. Under DDP every process runs as many passes (each forward broadcasts buffers), the extra ones again
        over its first group with weight 0. Under FSDP the passes would also have to agree on which hold retain
        rows (the sharded reference gathers its weights for them): there a micro-batch is one pass."""
        cost = pass_cost_for(self.parallel.device.type, self.config.pass_cost_tokens)
        groups = row_groups(micro, self.data, None if self.parallel.sharded else cost)
        count = len(groups)
        if self.parallel.num_processes > 1:
            count = self.parallel.max_over_processes(count)
        return [(group, weight) for group in groups] + [(groups[0], 0.0)] * (count - len(groups))

    # ---- strategies ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _quail_margin(self, setting: Quail) -> float:
        """QUAIL's margin (see `strategy.Quail.margin`), from the model before unlearning, kept with the run."""
        if self.state.quail_margin is not None:
            return self.state.quail_margin
        if setting.margin == "weight":
            margin = quail.quail_margin(self.transformer, setting.spec)
        elif setting.margin == "logit":
            margin = self._logit_margin(setting.spec)
        else:
            margin = float(setting.margin)
        self.state.quail_margin = margin
        return margin

    def _logit_margin(self, spec: QuantSpec) -> float:
        """Half the mean logit displacement that quantizing the original model causes on the forget chunks."""
        self.model.eval()
        total, weights = 0.0, 0
        for first in range(0, len(self.data.forget), self.config.batch_size):
            sequences = self.data.forget[first:first + self.config.batch_size]
            batch = {k: v.to(self.parallel.device) for k, v in collate(sequences, self.pad_id).items()}
            with self.parallel.autocast():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                with fake_quantized(self.unwrapped, spec):
                    quantized = self.model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits
            total += quail.logit_space_margin(logits, quantized, batch["labels"]) * len(sequences)
            weights += len(sequences)
        self.model.train()
        return total / weights

    def _batch(self, micro: MicroBatch) -> tuple[dict[str, torch.Tensor], int, int]:
        """The pass's rows, forget first, then IdkDPO's refusal twins of the forget rows, then retain; labels -100
        before each question/answer row's answer. Returns the batch, the number of forget rows and of rows before
        the retain rows."""
        data, n = self.data, len(micro.forget)
        sequences = [data.forget[i] for i in micro.forget]
        scored_from = [data.forget_scored_from[i] for i in micro.forget] if data.forget_scored_from else [0] * n
        if data.preferred is not None and data.preferred_scored_from is not None:
            sequences += [data.preferred[i] for i in micro.forget]
            scored_from += [data.preferred_scored_from[i] for i in micro.forget]
        before_retain = len(sequences)
        sequences += [data.retain[i] for i in micro.retain]
        batch = collate(sequences, self.pad_id)
        for row, start in enumerate(scored_from):
            batch["labels"][row, :start] = objectives.IGNORE_INDEX
        return {k: v.to(self.parallel.device) for k, v in batch.items()}, n, before_retain

    def _rmu_block(self, transformer: torch.nn.Module) -> torch.nn.Module:
        assert self.rmu_layer is not None
        return transformer_blocks(transformer)[self.rmu_layer]

    def _statistics(self, micro: MicroBatch) -> TokenStatistics:
        """One forward pass over the micro-batch's forget and retain chunks (one DDP forward per backward), reduced
        to per-position NLL (and KL to the reference, and each method's own statistics); chunked from the hidden
        states when `loss_chunk` is set."""
        config = self.config
        batch, n, before_retain = self._batch(micro)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        rows, has_retain = ids.shape[0], bool(micro.retain)
        stats = TokenStatistics()
        with contextlib.ExitStack() as stack:
            states = stack.enter_context(block_output(self._rmu_block(self.transformer))) \
                if self.rmu_layer is not None else None
            if config.loss_chunk:
                head = stack.enter_context(hidden_states_forward(self.transformer))
            output = self.model(input_ids=ids, attention_mask=mask).logits
        if states is not None:
            stats.forget_states, stats.forget_attention = states[0][:n], mask[:n]
            if has_retain and config.reg == "act":
                stats.retain_states, stats.retain_attention = states[0][before_retain:], mask[before_retain:]
                stats.ref_retain_states = self.reference.block_states(
                    self.unwrapped, ids[before_retain:], mask[before_retain:], self._rmu_block)
        if config.loss_chunk:
            hidden = output
            if before_retain:
                nll, scored = chunked_token_nll(hidden[:before_retain], head, labels[:before_retain], config.loss_chunk)
                self._split_forget_nll(stats, nll, scored, n)
            if has_retain and config.reg == "gdr":
                stats.retain_nll, stats.retain_mask = chunked_token_nll(hidden[before_retain:], head,
                                                                        labels[before_retain:], config.loss_chunk)
            elif has_retain and config.reg == "klr":
                ref_hidden, ref_head = self.reference.hidden_states(self.unwrapped, ids[before_retain:],
                                                                    mask[before_retain:])
                stats.retain_kl, stats.retain_mask = chunked_token_kl(hidden[before_retain:], head, ref_hidden,
                                                                      ref_head, labels[before_retain:],
                                                                      config.loss_chunk)
            return stats
        logits = output
        # every row scored by NLL in one call: the [B, T, V] logits are cut by rows only for rows needing another
        # statistic (KL), as each cut costs a full-size copy and a zero-filled full-size gradient
        nll_rows = before_retain if has_retain and config.reg == "klr" else rows
        if nll_rows:
            nll, scored = objectives.token_nll(_rows(logits, 0, nll_rows), labels[:nll_rows])
            self._split_forget_nll(stats, nll[:before_retain], scored[:before_retain], n)
            if nll_rows > before_retain and config.reg == "gdr":
                stats.retain_nll, stats.retain_mask = nll[before_retain:], scored[before_retain:]
        quail_hooks = self.hooks.quail
        needs_ref_logits = n and (quail_hooks is not None or config.method == "undial")
        ref_logits = self.reference.logits(self.unwrapped, ids[:n], mask[:n]) if needs_ref_logits else None
        if ref_logits is not None and quail_hooks is not None:
            stats.forget_hinge = quail_hooks.hinge(_rows(logits, 0, n), ref_logits, labels[:n])
        if ref_logits is not None and config.method == "undial":
            stats.forget_undial = objectives.undial_token_loss(_rows(logits, 0, n), ref_logits, labels[:n],
                                                               config.undial_strength)[0]
        if has_retain and config.reg == "klr":
            ref_logits = self.reference.logits(self.unwrapped, ids[before_retain:], mask[before_retain:])
            stats.retain_kl, stats.retain_mask = objectives.token_kl(_rows(logits, before_retain, rows), ref_logits,
                                                                     labels[before_retain:])
        return stats

    @staticmethod
    def _split_forget_nll(stats: TokenStatistics, nll: torch.Tensor, scored: torch.Tensor, n: int) -> None:
        """The forget rows' NLL, and IdkDPO's refusal rows' (the rows after them, before retain)."""
        if n:
            stats.forget_nll, stats.forget_mask = nll[:n], scored[:n]
        if nll.shape[0] > n:
            stats.preferred_nll, stats.preferred_mask = nll[n:], scored[n:]

    def _micro_batch_loss(self, micro: MicroBatch, counts: dict[str, float]) -> MicroLoss:
        """The micro-batch's loss, each term normalised by the global batch's counts."""
        config, stats = self.config, self._statistics(micro)
        forget, log_ratio = None, 0.0
        if stats.forget_nll is not None and stats.forget_mask is not None:
            forget, log_ratio = self._forget_term(stats, micro, counts)
        retain = None
        if stats.retain_nll is not None and stats.retain_mask is not None:
            retain = objectives.nll_from_tokens(stats.retain_nll, stats.retain_mask, counts["retain_tokens"])
        elif stats.retain_kl is not None and stats.retain_mask is not None:
            retain = objectives.kl_from_tokens(stats.retain_kl, stats.retain_mask, counts["retain_tokens"])
        elif stats.retain_states is not None and stats.ref_retain_states is not None \
                and stats.retain_attention is not None:
            retain = objectives.activation_mse_from_states(stats.retain_states, stats.ref_retain_states,
                                                           stats.retain_attention, counts["retain_sequences"])
        total = objectives.combine(forget, retain, config.gamma, config.alpha)
        hinge = None
        if stats.forget_hinge is not None and self.hooks.quail is not None:
            hinge = self.hooks.quail.term(stats.forget_hinge, counts["forget_tokens"])
            total = total + self.hooks.quail.setting.weight * hinge
        return MicroLoss(total=total, forget=forget, retain=retain, quail=hinge, log_ratio=log_ratio)

    def _forget_term(self, stats: TokenStatistics, micro: MicroBatch,
                     counts: dict[str, float]) -> tuple[torch.Tensor, float]:
        """The method's forget loss over the pass's forget rows, and NPO's / IdkDPO's summed log-ratio of the
        forget rows under the policy and the reference (0 otherwise)."""
        config, method = self.config, self.config.method
        forget_nll, forget_mask = stats.forget_nll, stats.forget_mask
        assert forget_nll is not None and forget_mask is not None
        tokens, sequences = counts["forget_tokens"], counts["forget_sequences"]
        if method == "ga":
            return -objectives.nll_from_tokens(forget_nll, forget_mask, tokens), 0.0
        if method == "wga":
            return objectives.wga_from_tokens(forget_nll, forget_mask, config.wga_power, tokens), 0.0
        if method == "satimp":
            return objectives.satimp_from_tokens(forget_nll, forget_mask, config.saturation_power,
                                                 config.importance_power, tokens), 0.0
        if method == "undial":
            assert stats.forget_undial is not None, "UNDIAL's statistic is formed in _statistics"
            return objectives.nll_from_tokens(stats.forget_undial, forget_mask, tokens), 0.0
        if method == "rmu":
            assert stats.forget_states is not None and stats.forget_attention is not None and self.control is not None
            return objectives.activation_mse_from_states(stats.forget_states, self.control, stats.forget_attention,
                                                         sequences), 0.0
        nll, count = objectives.sequence_sums(forget_nll, forget_mask)
        if config.uses_reference_nll:
            assert self.ref_nll is not None, "the reference NLLs are computed in setup()"
            ref = self.ref_nll[micro.forget]
            if method == "npo":
                log_ratio = float((ref.to(nll) - nll.detach()).sum())
                return objectives.npo_from_sequences(nll, ref, config.beta, sequences), log_ratio
            assert stats.preferred_nll is not None and stats.preferred_mask is not None
            preferred = objectives.sequence_sums(stats.preferred_nll, stats.preferred_mask)[0]
            log_ratio = float((ref[:, 0].to(nll) - nll.detach()).sum())
            return objectives.dpo_from_sequences(preferred, nll, ref[:, 1], ref[:, 0], config.beta,
                                                 sequences), log_ratio
        return objectives.simnpo_from_sequences(nll, count, config.beta, config.delta, sequences), 0.0

    def _step_tokens(self, step: Step) -> int:
        tokens = sum(len(self.data.forget[i]) for i in step.global_forget)
        if self.data.preferred is not None:
            tokens += sum(len(self.data.preferred[i]) for i in step.global_forget)
        if self.config.reg != "none":
            tokens += sum(len(self.data.retain[i]) for i in step.global_retain)
        return tokens

    def _hook_metrics(self, epoch: int) -> dict[str, float]:
        """The epoch hook's metrics, measured on every process, the main process's kept everywhere."""
        if self.epoch_hook is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.hooks.full_precision():  # the model as it is saved
            metrics = self.epoch_hook(epoch, self.unwrapped, self.tokenizer)
        return dict(self.parallel.broadcast(metrics) or {})

    # ---- non-finite losses ------------------------------------------------------------------------------------
    def _recover_from_non_finite(self, reason: str) -> None:
        """Back to the last finished epoch's checkpoint; with none, stop with a one-line error."""
        saved = storage.load_progress(self.out_dir)
        if saved is None or saved.fingerprint != self.fingerprint or self.state.epochs_done == 0:
            raise UserError(f"{reason} before any epoch finished; no model written (try a lower --lr)")
        storage.restore_checkpoint(self.parallel, self.model, self.optimizer, self.out_dir)
        saved.resumed_after = self.state.resumed_after  # this session's resume is not in the checkpoint
        self.state = saved
        self.state.stopped_reason = f"{reason}; kept the last good checkpoint (epoch {saved.epochs_done})"
        if self.parallel.is_main:
            print(f"warning: {self.state.stopped_reason}")

    # ---- end of an epoch --------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, losses: list[StepLoss]) -> bool:
        """Log the epoch, apply MUSE's selection rule, checkpoint. Returns True when training stops here."""
        state, config = self.state, self.config
        state.losses.extend(losses)
        state.epochs.append(EpochRecord(epoch=epoch, forget=sum(r.forget for r in losses) / len(losses),
                                        retain=sum(r.retain for r in losses) / len(losses),
                                        metrics=self._hook_metrics(epoch)))
        state.epochs_done = epoch
        if config.stop_knowmem_f is not None and select_epoch(state.epochs, config.stop_knowmem_f) == epoch:
            state.selected_epoch = epoch
            state.stopped_reason = (f"selected: epoch {epoch} knowmem_f {state.epochs[-1].metrics['knowmem_f']:.2f}"
                                    f" <= retrain {config.stop_knowmem_f:.2f} (MUSE rule)")
        stopping = epoch == config.epochs or state.stopped_reason != "completed"
        if config.save_every_epoch:
            self._save_model(storage.epoch_model_dir(self.out_dir, epoch), self._record("running"))
        if not stopping:
            storage.save_checkpoint(self.parallel, self.model, self.optimizer, self.out_dir, state)
        return stopping

    # ---- save -------------------------------------------------------------------------------------------------
    def save(self) -> UnlearnResult:
        record = self._record("finished")
        adapter_dir = None
        if self.config.adapter == "lora":
            adapter_dir = self.out_dir / "adapter"
            storage.save_adapter(self.parallel, self.model, adapter_dir, record)
        self._save_model(storage.final_model_dir(self.out_dir), record, final=True)
        if self.parallel.is_main:
            storage.write_record(self.out_dir, record)
            storage.remove_checkpoint(self.out_dir)
        self.parallel.wait()
        return UnlearnResult.from_progress(self.out_dir, self.state, adapter_dir)

    def _save_model(self, folder: Path, record: RunRecord, final: bool = False) -> None:
        dtype = source_dtype(self.model_path) if self.config.save_dtype == "source" \
            else resolve_dtype(self.config.save_dtype)
        storage.save_model_folder(self.parallel, self.model, self.tokenizer, folder, record, dtype,
                                  lora=self.config.adapter == "lora", in_place=final,
                                  source=(self.model_path, self.config))

    def _record(self, status: str) -> RunRecord:
        state = self.state
        return RunRecord(status=status, config=self.config, source_model=self.model_path,
                         lora_targets=self.lora_targets, forget_chunks=len(self.data.forget),
                         retain_chunks=len(self.data.retain), num_processes=self.parallel.num_processes,
                         mixed_precision=self.parallel.mixed_precision, progress=state.model_copy(deep=True),
                         tokens_per_second=state.tokens / state.seconds if state.seconds > 0 else 0.0,
                         provenance=self.provenance)


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop, or the tensor itself when that is all of it (no slice in the autograd graph)."""
    return tensor if start == 0 and stop == tensor.shape[0] else tensor[start:stop]


def _global_counts(step: Step, data: UnlearnData) -> dict[str, float]:
    """Scored tokens / sequences of the whole global batch (a chunk of n tokens scores n - 1)."""
    return {
        "forget_tokens": float(sum(len(data.forget[i]) - 1 for i in step.global_forget)),
        "forget_sequences": float(len(step.global_forget)),
        "retain_tokens": float(max(1, sum(len(data.retain[i]) - 1 for i in step.global_retain))),
        "retain_sequences": float(max(1, len(step.global_retain))),
    }


def _share_of_process(micro: MicroBatch, step: Step) -> tuple[MicroBatch, float]:
    """A process with no share of a short last batch still runs a forward and backward (with weight 0) so that
    DDP's gradient synchronisation happens on every process."""
    if micro.forget:
        return micro, 1.0
    return MicroBatch(step.global_forget[:1], step.global_retain[:1]), 0.0
