"""The unlearning loop: GA / NPO / SimNPO with a GDR / KLR retain term, full fine-tuning or LoRA, through
accelerate (`accelerate launch --num_processes N -m qrunlearn unlearn ...` runs DDP; FSDP / DeepSpeed
configs pass through to `Accelerator()`).

Read top to bottom: `unlearn()` sets up (model, reference, data, optimizer, resume), runs the epochs
(`_train_epoch`), and writes the output folders. Output layout of `out_dir`:

    model/          the model to evaluate / quantize (LoRA: merged with merge_and_unload), + unlearn.json
    adapter/        LoRA only: the adapter (peft format), + unlearn.json
    epochs/epoch_NNN/  per-epoch models when save_every_epoch (LoRA: merged)
    unlearn.json    settings, versions, per-step and per-epoch losses, hook metrics, stop reason
    checkpoint/     resume state while the run is unfinished (removed when it finishes)

Every folder is written to a temporary sibling and renamed into place; `unlearn.json` with
"status": "finished" is written last, so a folder that looks finished is finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrunlearn.data.muse import MuseCorpus
from qrunlearn.errors import UserError
from qrunlearn.io import atomic_directory, atomic_write_json, run_metadata, set_seed
from qrunlearn.unlearn import objectives
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.data import Step, UnlearnData, check_texts, collate, epoch_schedule, load_unlearn_data
from qrunlearn.unlearn.select import select_epoch

EpochHook = Callable[[int, Any, Any], "dict[str, Any] | None"]
STATE_FILE = "unlearn.json"


@dataclass
class UnlearnResult:
    model_dir: Path
    adapter_dir: Path | None
    losses: list[dict[str, float]]  # one row per optimizer step: epoch, step, forget, retain, loss
    epoch_metrics: list[dict[str, Any]]  # one row per epoch: mean losses + the hook's metrics
    epochs_run: int
    stopped_reason: str  # "completed" | "selected: ..." | "non-finite loss: ..."
    selected_epoch: int | None = None
    seconds: float = 0.0
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_fingerprint(model_path: str, data: UnlearnData, config: UnlearnConfig) -> str:
    """Identifies a run (model, tokenised data, settings): a checkpoint resumes only the same run."""
    digest = hashlib.sha256()
    digest.update(str(Path(model_path).resolve() if Path(model_path).exists() else model_path).encode())
    digest.update(config.model_dump_json().encode())
    digest.update(json.dumps([data.forget, data.retain]).encode())
    return digest.hexdigest()[:16]


# ---- reference quantities -------------------------------------------------------------------------------------
@torch.no_grad()
def reference_sequence_nll(model, data: UnlearnData, batch_size: int, pad_id: int) -> torch.Tensor:
    """NLL_ref(x) summed over each forget chunk, computed once: the reference never changes, so NPO needs no
    reference forward pass during training."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for first in range(0, len(data.forget), batch_size):
        batch = collate(data.forget[first:first + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values.append(objectives.sequence_nll(logits, batch["labels"])[0].float().cpu())
    model.train(was_training)
    return torch.cat(values)


class _Reference:
    """p_ref for KLR: LoRA runs the same model with adapters disabled (no second copy); full FT keeps a frozen
    copy made before training."""

    def __init__(self, config: UnlearnConfig, model):
        self.copy = None
        if config.reg == "klr" and config.adapter == "full":
            import copy

            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, unwrapped_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return self.copy(input_ids=input_ids, attention_mask=attention_mask).logits
        with unwrapped_model.disable_adapter():
            return unwrapped_model(input_ids=input_ids, attention_mask=attention_mask).logits


# ---- one optimizer step ---------------------------------------------------------------------------------------
def _micro_batch_loss(model, unwrapped, reference: _Reference, config: UnlearnConfig, data: UnlearnData,
                      ref_nll: torch.Tensor | None, forget_ids: list[int], retain_ids: list[int], pad_id: int,
                      counts: dict[str, float], device) -> tuple[torch.Tensor, float, float]:
    """(loss to backpropagate, forget term, retain term) of one micro-batch, normalised by the global counts.

    Forget and retain chunks go through the model in one forward pass (one DDP forward per backward)."""
    sequences = [data.forget[i] for i in forget_ids] + [data.retain[i] for i in retain_ids]
    batch = {k: v.to(device) for k, v in collate(sequences, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = len(forget_ids)
    f_logits, f_labels = logits[:n], batch["labels"][:n]
    if config.method == "ga":
        forget = objectives.ga_loss(f_logits, f_labels, num_tokens=counts["forget_tokens"])
    elif config.method == "npo":
        forget = objectives.npo_loss(f_logits, f_labels, ref_nll[forget_ids], config.beta,
                                     num_sequences=counts["forget_sequences"])
    else:
        forget = objectives.simnpo_loss(f_logits, f_labels, config.beta, config.delta,
                                        num_sequences=counts["forget_sequences"])
    retain = None
    if config.reg != "none":
        r_logits, r_labels = logits[n:], batch["labels"][n:]
        if config.reg == "gdr":
            retain = objectives.nll_loss(r_logits, r_labels, num_tokens=counts["retain_tokens"])
        else:
            ref_logits = reference.logits(unwrapped, batch["input_ids"][n:], batch["attention_mask"][n:])
            retain = objectives.kl_loss(r_logits, ref_logits, r_labels, num_tokens=counts["retain_tokens"])
    loss = objectives.combine(forget, retain, config.gamma, config.alpha)
    return loss, float(forget.detach()), float(retain.detach()) if retain is not None else 0.0


def _global_counts(step: Step, data: UnlearnData) -> dict[str, float]:
    """Scored tokens / sequences of the whole global batch (a chunk of n tokens scores n - 1)."""
    return {
        "forget_tokens": float(sum(len(data.forget[i]) - 1 for i in step.global_forget)),
        "forget_sequences": float(len(step.global_forget)),
        "retain_tokens": float(max(1, sum(len(data.retain[i]) - 1 for i in step.global_retain))),
    }


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _save_checkpoint(accelerator, out_dir: Path, state: dict[str, Any]) -> None:
    """Resume state (model, optimizer, RNG via accelerate + our JSON), swapped in atomically."""
    final, tmp = out_dir / "checkpoint", out_dir / ".checkpoint.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "state.json", state)
        if final.exists():
            trash = out_dir / f".checkpoint.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()


def _load_checkpoint_state(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "checkpoint" / "state.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _save_model_folder(accelerator, model, tokenizer, config: UnlearnConfig, source_dtype: torch.dtype,
                       folder: Path, record: dict[str, Any], merge: bool, in_place: bool = False) -> None:
    """A standard HF folder (weights in the configured dtype, tokenizer, unlearn.json), written atomically by
    the main process. `merge`: LoRA's merged model (W + (alpha/r) B A) instead of the peft model; `in_place`
    merges the training model itself (end of run: no extra copy in memory) instead of a copy."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; same tensors under DDP
    if not accelerator.is_main_process:
        return
    to_save = unwrapped
    if merge:
        from qrunlearn.unlearn.lora import merged_copy

        to_save = unwrapped.merge_and_unload() if in_place else merged_copy(unwrapped)
        state_dict = None
    dtype = {"source": source_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[config.save_dtype]
    with atomic_directory(folder) as tmp:
        if state_dict is not None and not merge and dtype != torch.float32:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        if merge and dtype != torch.float32:
            to_save = to_save.to(dtype)
        to_save.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / STATE_FILE, record)


def _source_dtype(model_path: str) -> torch.dtype:
    config_path = Path(model_path) / "config.json"
    name = None
    if config_path.exists():
        config = json.loads(config_path.read_text())
        name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _accelerator():
    from accelerate import Accelerator

    # `accelerate launch` passes its mixed-precision setting by environment; without one, bf16 autocast on a
    # bf16-capable GPU (fp32 master weights: a 1e-5 step survives), plain fp32 elsewhere.
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed is None:
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mixed)


# ---- the run --------------------------------------------------------------------------------------------------
def unlearn(model_path: str | Path, corpus: MuseCorpus, config: UnlearnConfig, out_dir: str | Path,
            epoch_hook: EpochHook | None = None, progress: bool = True, resume: bool = True) -> UnlearnResult:
    """Unlearn `config.forget_split` of `corpus` from the model at `model_path`; write `out_dir` (see the
    module docstring) and return where the result is.

    `epoch_hook(epoch, model, tokenizer)` runs after each epoch on every process, with the model in eval mode
    (gradients off) in its current state: for LoRA that is the *peft model with adapters active, not merged*
    (its outputs equal the merged model's up to float rounding). Its returned dict is logged per epoch; when
    `config.stop_knowmem_f` is set, the key "knowmem_forget" drives MUSE's selection (stop at the first epoch
    with knowmem_forget <= stop_knowmem_f). The main process's dict is used on all processes.

    `resume`: continue from `out_dir/checkpoint` when it belongs to the same run, or return the recorded
    result when `out_dir` already holds this run finished. `resume=False` starts over."""
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    from qrunlearn.models.loading import load_causal_lm

    model_path = str(model_path)
    out_dir = Path(out_dir)
    if config.stop_knowmem_f is not None and epoch_hook is None:
        raise UserError("stop_knowmem_f (MUSE selection) needs an epoch hook that reports 'knowmem_forget'")
    accelerator = _accelerator()
    set_seed(config.seed)

    check_texts(corpus, config.forget_split, config.retain_split, needs_retain=config.reg != "none")
    model, tokenizer = load_causal_lm(model_path, dtype="float32", device=accelerator.device)
    source_dtype = _source_dtype(model_path)
    data = load_unlearn_data(corpus, tokenizer, config.forget_split, config.retain_split,
                             needs_retain=config.reg != "none", max_length=config.max_length)
    fingerprint = run_fingerprint(model_path, data, config)

    finished = _finished_result(out_dir, fingerprint) if resume else None
    if finished is not None:
        return finished
    if (out_dir / STATE_FILE).exists() and resume:
        raise UserError(f"{out_dir / STATE_FILE}: {out_dir} holds a different run (other model, data or "
                        f"settings); choose another output folder or start over (--no-resume)")

    metadata = run_metadata(config.model_dump(mode="json"), config.seed)  # versions, commit: once per run
    pad_id = tokenizer.pad_token_id
    ref_nll = reference_sequence_nll(model, data, config.batch_size, pad_id) if config.method == "npo" else None
    reference = _Reference(config, model)
    lora_targets: list[str] | None = None
    if config.adapter == "lora":
        from qrunlearn.unlearn.lora import wrap_lora

        model, lora_targets = wrap_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        config.lora_targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # AdamW with a constant learning rate (the paper's schedule); no scheduler object needed.
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device

    losses: list[dict[str, float]] = []
    epoch_metrics: list[dict[str, Any]] = []
    start_epoch, tokens, seconds = 0, 0, 0.0
    saved = _load_checkpoint_state(out_dir) if resume else None
    if saved is not None and saved.get("fingerprint") == fingerprint:
        accelerator.load_state(str(out_dir / "checkpoint" / "accelerate"))
        start_epoch, losses, epoch_metrics = saved["epoch"], saved["losses"], saved["epoch_metrics"]
        tokens, seconds = saved["tokens"], saved["seconds"]
        if progress and accelerator.is_main_process:
            print(f"resuming {out_dir} after epoch {start_epoch}")
    elif accelerator.is_main_process:
        for stale in ("checkpoint", "model", "adapter", "epochs", STATE_FILE):
            path = out_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    steps_per_epoch = len(epoch_schedule(len(data.forget), len(data.retain), 0, config.seed, config.batch_size,
                                         config.grad_accum, accelerator.process_index, accelerator.num_processes))
    bar = tqdm(total=steps_per_epoch * config.epochs, initial=steps_per_epoch * start_epoch, desc="unlearn",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    stopped_reason, selected = "completed", None
    epochs_run = start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        bad = None
        epoch_rows = []
        for step_index, step in enumerate(epoch_schedule(
                len(data.forget), len(data.retain), epoch, config.seed, config.batch_size, config.grad_accum,
                accelerator.process_index, accelerator.num_processes), start=1):
            counts = _global_counts(step, data)
            forget_sum, retain_sum = 0.0, 0.0
            for m, micro in enumerate(step.micro_batches):
                forget_ids, retain_ids, weight = micro.forget, micro.retain, 1.0
                if not forget_ids:  # this process has no share of a short last batch: keep DDP in step
                    forget_ids, retain_ids, weight = step.global_forget[:1], step.global_retain[:1], 0.0
                sync = nullcontext() if m == len(step.micro_batches) - 1 else accelerator.no_sync(model)
                with sync:
                    loss, f_val, r_val = _micro_batch_loss(model, unwrapped, reference, config, data, ref_nll,
                                                           forget_ids, retain_ids, pad_id, counts, device)
                    # DDP averages gradients over processes; the losses are already global means.
                    accelerator.backward(loss * (weight * accelerator.num_processes))
                forget_sum += weight * f_val
                retain_sum += weight * r_val
            totals = accelerator.reduce(torch.tensor([forget_sum, retain_sum], device=device), reduction="sum")
            f_step, r_step = float(totals[0]), float(totals[1])
            total = config.gamma * f_step + (config.alpha * r_step if config.reg != "none" else 0.0)
            if not math.isfinite(total):
                bad = f"non-finite loss at epoch {epoch} step {step_index}"
                optimizer.zero_grad(set_to_none=True)
                break
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(len(data.forget[i]) for i in step.global_forget)
            tokens += sum(len(data.retain[i]) for i in step.global_retain) if config.reg != "none" else 0
            row = {"epoch": epoch, "step": step_index, "forget": f_step, "retain": r_step, "loss": total}
            epoch_rows.append(row)
            bar.update(1)
            bar.set_postfix(epoch=epoch, forget=f"{f_step:.3f}", retain=f"{r_step:.3f}")
        if bad is not None:
            stopped_reason = _restore_last_good(accelerator, out_dir, fingerprint, bad, epochs_run)
            break
        seconds += time.perf_counter() - t0
        losses.extend(epoch_rows)
        summary: dict[str, Any] = {
            "epoch": epoch,
            "forget": sum(r["forget"] for r in epoch_rows) / len(epoch_rows),
            "retain": sum(r["retain"] for r in epoch_rows) / len(epoch_rows),
        }
        if epoch_hook is not None:
            model.eval()
            with torch.no_grad():
                metrics = epoch_hook(epoch, unwrapped, tokenizer)
            shared = [metrics]
            broadcast_object_list(shared, from_process=0)
            summary.update(shared[0] or {})
        epoch_metrics.append(summary)
        epochs_run = epoch
        if config.stop_knowmem_f is not None:
            selected = select_epoch(epoch_metrics, config.stop_knowmem_f)
            if selected == epoch:
                stopped_reason = (f"selected: epoch {epoch} knowmem_forget {summary['knowmem_forget']:.2f} <= "
                                  f"retrain {config.stop_knowmem_f:.2f} (MUSE rule)")
        record = _record(config, fingerprint, model_path, lora_targets, losses, epoch_metrics, epochs_run,
                         "running", stopped_reason, tokens, seconds, data, accelerator, metadata)
        if config.save_every_epoch:
            _save_model_folder(accelerator, model, tokenizer, config, source_dtype,
                               out_dir / "epochs" / f"epoch_{epoch:03d}", record, merge=config.adapter == "lora")
        last_epoch = epoch == config.epochs or stopped_reason != "completed"
        if not last_epoch:
            _save_checkpoint(accelerator, out_dir, {"fingerprint": fingerprint, "epoch": epoch, "losses": losses,
                                                    "epoch_metrics": epoch_metrics, "tokens": tokens,
                                                    "seconds": seconds})
        if stopped_reason != "completed":
            break
    bar.close()

    if stopped_reason.startswith("non-finite"):
        saved = _load_checkpoint_state(out_dir)
        losses, epoch_metrics = saved["losses"], saved["epoch_metrics"]
        tokens, seconds = saved["tokens"], saved["seconds"]
        if accelerator.is_main_process:
            print(f"warning: {stopped_reason}")
    record = _record(config, fingerprint, model_path, lora_targets, losses, epoch_metrics, epochs_run,
                     "finished", stopped_reason, tokens, seconds, data, accelerator, metadata)
    record["selected_epoch"] = selected
    adapter_dir = None
    if config.adapter == "lora":
        adapter_dir = out_dir / "adapter"
        if accelerator.is_main_process:
            with atomic_directory(adapter_dir) as tmp:
                unwrapped.save_pretrained(str(tmp), safe_serialization=True)
                atomic_write_json(tmp / STATE_FILE, record)
    _save_model_folder(accelerator, model, tokenizer, config, source_dtype, out_dir / "model", record,
                       merge=config.adapter == "lora", in_place=True)
    if accelerator.is_main_process:
        atomic_write_json(out_dir / STATE_FILE, record)
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    accelerator.wait_for_everyone()
    return UnlearnResult(model_dir=out_dir / "model", adapter_dir=adapter_dir, losses=losses,
                         epoch_metrics=epoch_metrics, epochs_run=epochs_run, stopped_reason=stopped_reason,
                         selected_epoch=selected, seconds=seconds, tokens=tokens)


def _restore_last_good(accelerator, out_dir: Path, fingerprint: str, reason: str, epochs_run: int) -> str:
    """Reload the last epoch checkpoint after a NaN/inf loss; with none, stop with a one-line error."""
    saved = _load_checkpoint_state(out_dir)
    if saved is None or saved.get("fingerprint") != fingerprint or epochs_run == 0:
        raise UserError(f"{reason} before any epoch finished; no model written (try a lower --lr)")
    accelerator.load_state(str(out_dir / "checkpoint" / "accelerate"))
    return f"{reason}; kept the last good checkpoint (epoch {saved['epoch']})"


def _record(config: UnlearnConfig, fingerprint: str, model_path: str, lora_targets: list[str] | None,
            losses: list[dict[str, float]], epoch_metrics: list[dict[str, Any]], epochs_run: int, status: str,
            stopped_reason: str, tokens: int, seconds: float, data: UnlearnData, accelerator,
            metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": status,
        "fingerprint": fingerprint,
        "source_model": model_path,
        "lora_targets": lora_targets,
        "forget_chunks": len(data.forget),
        "retain_chunks": len(data.retain),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "epochs_run": epochs_run,
        "stopped_reason": stopped_reason,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "epoch_metrics": epoch_metrics,
        "losses": losses,
        **metadata,
    }


def _finished_result(out_dir: Path, fingerprint: str) -> UnlearnResult | None:
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "finished" or record.get("fingerprint") != fingerprint:
        return None
    adapter = out_dir / "adapter"
    return UnlearnResult(model_dir=out_dir / "model", adapter_dir=adapter if adapter.is_dir() else None,
                         losses=record["losses"], epoch_metrics=record["epoch_metrics"],
                         epochs_run=record["epochs_run"], stopped_reason=record["stopped_reason"],
                         selected_epoch=record.get("selected_epoch"), seconds=record["seconds"],
                         tokens=record["tokens"], extra={"reused": True})
