"""How the training model is spread over processes: everything distributed lives here.

Two ways, chosen by `UnlearnConfig.sharding`:

- `DataParallel` ("none"): one process, or DDP over the processes `accelerate launch --num_processes N` started
  (NCCL on GPUs; gloo on CPUs with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...`). Every process holds
  the whole model; accelerate handles bf16 autocast, gradient sync and checkpoints.
- `FullySharded` ("fsdp"): FSDP2 (`torch.distributed.fsdp.fully_shard`) over the same processes: each transformer
  block and the root are sharded, so weights, gradients and optimizer state are split N ways. It is built on
  torch directly (accelerate's FSDP plugin needs GPUs), so it runs on GPUs and on CPUs alike and is tested with two
  CPU processes. Checkpoints use torch.distributed.checkpoint; the final model is gathered to rank 0 and saved once.

Precision (`UnlearnConfig.dtype`, `.precision`): fp32; bf16 "mixed" (fp32 master weights and optimizer state, bf16
compute: accelerate's autocast, or FSDP2's MixedPrecisionPolicy); bf16 "pure" (weights, gradients and optimizer state
in bf16, as the paper's seed code trains: HF Trainer with bf16=True on a model loaded in bf16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import nn

from qrunlearn.errors import UserError
from qrunlearn.models.layers import block_list_names
from qrunlearn.models.loading import resolve_dtype
from qrunlearn.typing import HFModel
from qrunlearn.unlearn.config import UnlearnConfig

OptimizerFactory = Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def compute_dtype(config: UnlearnConfig, device: torch.device) -> torch.dtype:
    """The dtype matrix products run in."""
    return resolve_dtype(config.dtype, device)


def weights_dtype(config: UnlearnConfig, device: torch.device) -> torch.dtype:
    """The dtype the model is loaded in: the compute dtype under "pure" bf16, and for LoRA's frozen base (peft keeps
    its adapters in fp32 under mixed precision); fp32 master weights for full fine-tuning under mixed precision."""
    dtype = compute_dtype(config, device)
    return dtype if (config.precision == "pure" or config.adapter == "lora") else torch.float32


def check_bf16_supported(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bfloat16: this GPU has no bf16 support; use --dtype float32")
    if device.type == "cpu" and not _cpu_has_bf16():
        raise UserError("--dtype bfloat16: this CPU has no bf16 instructions (AVX512-BF16 / AMX); use --dtype float32")


def _cpu_has_bf16() -> bool:
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


class DataParallel:
    """A single process or DDP, through accelerate."""

    sharded = False

    def __init__(self, config: UnlearnConfig):
        mixed = "no"
        probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if compute_dtype(config, probe) == torch.bfloat16:
            check_bf16_supported(probe)
            mixed = "bf16" if config.precision == "mixed" else "no"
        _forget_other_precision(mixed)
        self.accelerator = Accelerator(mixed_precision=mixed)
        self.device = self.accelerator.device
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.mixed_precision = str(self.accelerator.mixed_precision)

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> HFModel:
        return self.accelerator.unwrap_model(model)

    def accumulating(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: skip the gradient all-reduce on every micro-batch but the last."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)

    def sum_over_processes(self, values: Sequence[float]) -> list[float]:
        totals = self.accelerator.reduce(torch.tensor(list(values), device=self.device), reduction="sum")
        return [float(v) for v in totals]

    def max_over_processes(self, value: int) -> int:
        return int(self.accelerator.gather(torch.tensor([value], device=self.device)).max())

    def broadcast(self, value: Any) -> Any:
        shared = [value]
        broadcast_object_list(shared, from_process=0)
        return shared[0]

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the main process (None elsewhere)."""
        state = self.accelerator.get_state_dict(model)
        return state if self.is_main else None

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        self.accelerator.load_state(str(folder))


class FullySharded:
    """FSDP2 over the processes of a `accelerate launch` / torchrun job."""

    sharded = True

    def __init__(self, config: UnlearnConfig):
        self.config = config
        _forget_other_precision("no")
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())  # process group and device only
        self.device = self.accelerator.device
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        if self.num_processes < 2:
            raise UserError("--sharding fsdp needs several processes: run under `accelerate launch --num_processes N`"
                            " (on CPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N)")
        dtype = compute_dtype(config, self.device)
        if dtype == torch.bfloat16:
            check_bf16_supported(self.device)
        self.mixed = dtype == torch.bfloat16 and config.precision == "mixed"
        self.mixed_precision = "bf16 (FSDP2 MixedPrecisionPolicy)" if self.mixed else "no"

    def shard(self, model: ModuleT) -> ModuleT:
        """Shard each transformer block, then the root (embeddings, norm, head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # the default policy (fully_shard's own default) casts nothing
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed
                  else MixedPrecisionPolicy())
        for name in block_list_names(model):
            for block in cast(nn.ModuleList, model.get_submodule(name)):  # block_list_names finds ModuleLists
                fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.shard(model.to(self.device))
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> HFModel:
        return model

    def accumulating(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Every micro-batch reduce-scatters its gradients, `sync` or not: skipping it (FSDP2's
        `set_requires_gradient_sync(False)`) keeps each parameter's unsharded fp32 gradient until the step, the
        memory sharding is for (25 GiB at 7B). One reduce-scatter per micro-batch instead of per step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2's policy casts the weights; no autocast region

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sum_over_processes(self, values: Sequence[float]) -> list[float]:
        totals = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return [float(v) for v in totals]

    def max_over_processes(self, value: int) -> int:
        largest = torch.tensor([value], device=self.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest)

    def broadcast(self, value: Any) -> Any:
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def wait(self) -> None:
        dist.barrier()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # full_state_dict=True gathers every entry into a plain tensor (no DTensor / ShardedTensor is left)
        state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
        return state if self.is_main else None

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "sharded"))
        save_file(_rng_state(), str(folder / f"rng_{self.process_index}.safetensors"))

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}  # dcp loads into it in place
        dcp.load(state, checkpoint_id=str(folder / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        _set_rng_state(load_file(str(folder / f"rng_{self.process_index}.safetensors")))


def _forget_other_precision(mixed: str) -> None:
    """accelerate keeps one mixed-precision setting per process and refuses another; one process may run several
    unlearning runs (a grid, the tests) with different precisions, so a different earlier setting is dropped. The
    process group (accelerate's PartialState) is kept."""
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


Parallel = DataParallel | FullySharded


def make_parallel(config: UnlearnConfig) -> Parallel:
    return FullySharded(config) if config.sharding == "fsdp" else DataParallel(config)
