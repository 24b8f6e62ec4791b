"""What an unlearning run writes: resume checkpoints, model folders and its `unlearn.json` record.

Every folder is written to a temporary sibling and renamed into place (`qrunlearn.io`); the record with status
"finished" is written last, so a folder that looks finished is finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from pydantic import ValidationError
from torch import nn

from qrunlearn.io import (
    atomic_directory,
    atomic_write_json,
    crash_point,
    library_write_errors,
    replace_directory,
    restore_interrupted_swaps,
)
from qrunlearn.models.loading import load_causal_lm
from qrunlearn.models.source import MODEL_POINTER, write_model_pointer
from qrunlearn.typing import HFModel
from qrunlearn.unlearn.config import UnlearnConfig
from qrunlearn.unlearn.lora import merged_copy, wrap_lora
from qrunlearn.unlearn.parallel import Parallel
from qrunlearn.unlearn.records import Progress, RunRecord

RECORD_FILE = "unlearn.json"
CHECKPOINT = "checkpoint"
MODEL = "model"
OUTPUTS = (CHECKPOINT, MODEL, "adapter", "epochs", RECORD_FILE, MODEL_POINTER)


def final_model_dir(out_dir: Path) -> Path:
    """Where a run keeps its final model (LoRA: merged), the one `out_dir`'s pointer names."""
    return out_dir / MODEL


def epoch_model_dir(out_dir: Path, epoch: int) -> Path:
    """Where a run keeps the model saved after `epoch` (`save_every_epoch`)."""
    return out_dir / "epochs" / f"epoch_{epoch:03d}"


def save_checkpoint(parallel: Parallel, model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path,
                    progress: Progress) -> None:
    """Model, optimizer and RNG states plus `progress`, swapped in as one folder."""
    final, tmp = out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.tmp"
    if parallel.is_main and tmp.exists():
        shutil.rmtree(tmp)
    parallel.wait()
    with library_write_errors(final):
        parallel.save_checkpoint(model, optimizer, tmp / "state")
    parallel.wait()
    if parallel.is_main:
        atomic_write_json(tmp / "state.json", progress)
        replace_directory(tmp, final)
        crash_point("saved", final)  # the Ctrl-C test interrupts here: a whole checkpoint, training not finished
    parallel.wait()


def load_progress(out_dir: Path) -> Progress | None:
    """The progress saved with the checkpoint in `out_dir`, or None (no checkpoint, or an unreadable one)."""
    path = out_dir / CHECKPOINT / "state.json"
    try:
        return Progress.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


def restore_checkpoint(parallel: Parallel, model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
    parallel.load_checkpoint(model, optimizer, out_dir / CHECKPOINT / "state")


def read_record(out_dir: Path) -> RunRecord | None:
    try:
        return RunRecord.model_validate_json((out_dir / RECORD_FILE).read_text())
    except (OSError, ValidationError, json.JSONDecodeError):
        return None


def write_record(out_dir: Path, record: RunRecord) -> None:
    """The finished run's record, after the pointer to its final model (`models.source.MODEL_POINTER`), which lets
    every command take `out_dir` where a model is expected; the record comes last, as the sign of a finished run."""
    write_model_pointer(out_dir, final_model_dir(out_dir))
    atomic_write_json(out_dir / RECORD_FILE, record)


def remove_checkpoint(out_dir: Path) -> None:
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)


def tidy(out_dir: Path) -> None:
    """Put `out_dir` in order after a killed run (main process, before the run reads anything from it): a folder
    swap cut between its renames (a checkpoint, a model) gets its old folder back, and temporaries and old copies
    (a checkpoint's worth of disk each) go, in the run folder and among its per-epoch models."""
    for folder in (out_dir, out_dir / "epochs"):
        if folder.is_dir():
            restore_interrupted_swaps(folder)


def clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier, different run left in `out_dir` (main process only)."""
    for name in OUTPUTS:
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def save_model_folder(parallel: Parallel, model: nn.Module, tokenizer, folder: Path, record: RunRecord,
                      dtype: torch.dtype, lora: bool, in_place: bool, source: tuple[str, UnlearnConfig]) -> None:
    """A standard HF folder (weights in `dtype`, tokenizer, unlearn.json), written atomically by the main process.
    LoRA is saved merged (W + (alpha/r) B A): `in_place` merges the training model itself (end of run: no extra
    copy in memory) instead of a copy. A sharded model is first gathered whole onto the main process."""
    if parallel.sharded:
        to_save, state_dict = _gathered(parallel, model, source, lora), None
    else:
        state_dict = parallel.full_state_dict(model)  # a collective under DDP too; None off the main process
        unwrapped = parallel.unwrap(model)
        if parallel.is_main and lora:
            to_save, state_dict = (unwrapped.merge_and_unload() if in_place else merged_copy(unwrapped)), None
        else:
            to_save = unwrapped
    if not parallel.is_main or to_save is None:
        return
    with atomic_directory(folder) as tmp:
        if state_dict is not None and dtype != torch.float32:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        if state_dict is None and dtype != next(to_save.parameters()).dtype:
            to_save = to_save.to(dtype)
        to_save.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / RECORD_FILE, record)


def _gathered(parallel: Parallel, model: nn.Module, source: tuple[str, UnlearnConfig], lora: bool) -> HFModel | None:
    """The sharded model's weights gathered onto the main process as a plain (for LoRA: merged) model on the CPU;
    None on the other processes. The plain model is rebuilt from the source folder, then given the trained weights."""
    state = parallel.full_state_dict(model)  # a collective: every process calls it
    if not parallel.is_main:
        return None
    assert state is not None, "full_state_dict returns the weights on the main process"
    model_path, config = source
    plain, _ = load_causal_lm(model_path, dtype="float32", device="cpu", with_tokenizer=False)
    if lora:
        plain, _ = wrap_lora(plain, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    plain.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return plain.merge_and_unload() if lora else plain


def save_adapter(parallel: Parallel, model: nn.Module, folder: Path, record: RunRecord) -> None:
    state = parallel.full_state_dict(model) if parallel.sharded else None
    if parallel.is_main:
        with atomic_directory(folder) as tmp:
            unwrapped = parallel.unwrap(model)
            if state is not None:  # only the adapter's tensors, as peft saves them
                state = get_peft_model_state_dict(unwrapped, state_dict=state)
                unwrapped.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
            else:
                unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            atomic_write_json(tmp / RECORD_FILE, record)
