"""What an unlearning run writes: resume checkpoints, model folders and its `unlearn.json` record.

Every folder is written to a temporary sibling and renamed into place (`qrunlearn.io`); the record with status
"finished" is written last, so a folder that looks finished is finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError

from qrunlearn.io import atomic_directory, atomic_write_json, replace_directory
from qrunlearn.unlearn.lora import merged_copy
from qrunlearn.unlearn.records import Progress, RunRecord

RECORD_FILE = "unlearn.json"
CHECKPOINT = "checkpoint"
OUTPUTS = (CHECKPOINT, "model", "adapter", "epochs", RECORD_FILE)


def save_checkpoint(accelerator, out_dir: Path, progress: Progress) -> None:
    """Model, optimizer and RNG states (accelerate) plus `progress`, swapped in as one folder."""
    final, tmp = out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "state.json", progress)
        replace_directory(tmp, final)
    accelerator.wait_for_everyone()


def load_progress(out_dir: Path) -> Progress | None:
    """The progress saved with the checkpoint in `out_dir`, or None (no checkpoint, or an unreadable one)."""
    path = out_dir / CHECKPOINT / "state.json"
    try:
        return Progress.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


def restore_checkpoint(accelerator, out_dir: Path) -> None:
    accelerator.load_state(str(out_dir / CHECKPOINT / "accelerate"))


def read_record(out_dir: Path) -> RunRecord | None:
    try:
        return RunRecord.model_validate_json((out_dir / RECORD_FILE).read_text())
    except (OSError, ValidationError, json.JSONDecodeError):
        return None


def write_record(out_dir: Path, record: RunRecord) -> None:
    atomic_write_json(out_dir / RECORD_FILE, record)


def remove_checkpoint(out_dir: Path) -> None:
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)


def clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier, different run left in `out_dir` (main process only)."""
    for name in OUTPUTS:
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def save_model_folder(accelerator, model, tokenizer, folder: Path, record: RunRecord, dtype: torch.dtype,
                      merge: bool, in_place: bool = False) -> None:
    """A standard HF folder (weights in `dtype`, tokenizer, unlearn.json), written atomically by the main
    process. `merge`: LoRA's merged model (W + (alpha/r) B A) instead of the peft model; `in_place` merges the
    training model itself (end of run: no extra copy in memory) instead of a copy."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; same tensors under DDP
    if not accelerator.is_main_process:
        return
    to_save = unwrapped
    if merge:
        to_save = unwrapped.merge_and_unload() if in_place else merged_copy(unwrapped)
        state_dict = None
    with atomic_directory(folder) as tmp:
        if state_dict is not None and dtype != torch.float32:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        if merge and dtype != torch.float32:
            to_save = to_save.to(dtype)
        to_save.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / RECORD_FILE, record)


def save_adapter(accelerator, model, folder: Path, record: RunRecord) -> None:
    if accelerator.is_main_process:
        with atomic_directory(folder) as tmp:
            accelerator.unwrap_model(model).save_pretrained(str(tmp), safe_serialization=True)
            atomic_write_json(tmp / RECORD_FILE, record)
