"""FSDP2 sharding on two CPU processes (gloo) against one process at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qrunlearn.cli import main

COMMON = ["--defaults", "tiny", "--max-length", "128", "--alpha", "1", "--no-progress", "--method", "npo",
          "--reg", "klr"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str]) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), "-m", "qrunlearn", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # two accelerate processes: ~50 s each; .ci/run runs it
@pytest.mark.parametrize("adapter,extra", [
    ("full", ["--lr", "1e-3", "--epochs", "2"]),  # two epochs: the sharded checkpoint is written in between
    ("lora", ["--lr", "1e-2", "--epochs", "1", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]),
])
def test_fsdp_on_two_processes_matches_one_process(adapter, extra, tiny_model_dir, tiny_corpus_dir, tmp_path):
    args = ["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--strategy", adapter,
            *COMMON, *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    # The same global batch of 4 sequences. Full fine-tuning: one process, 4 micro-batches of 1, against two
    # processes, 2 micro-batches of 1 each (gradients reduce-scattered after every micro-batch, accumulated
    # sharded). LoRA: one process, 2 x 2, against two processes, one micro-batch of 2, losses formed in chunks of 16
    # positions. One pass per micro-batch, as under FSDP (grouping by length would change the summation order).
    single, sharded = ((["--batch-size", "1", "--grad-accum", "4"], ["--batch-size", "1", "--grad-accum", "2"])
                       if adapter == "full" else
                       (["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2", "--loss-chunk", "16"]))
    assert main([*args, "--out", str(one), *single, "--pass-cost-tokens", "1000000"]) == 0
    _launch_two([*args, "--out", str(two), "--sharding", "fsdp", *sharded])

    rec1, rec2 = (json.loads((run / "unlearn.json").read_text()) for run in (one, two))
    assert rec1["num_processes"] == 1 and rec2["num_processes"] == 2 and rec2["config"]["sharding"] == "fsdp"
    losses1, losses2 = rec1["progress"]["losses"], rec2["progress"]["losses"]
    assert len(losses1) == len(losses2) > 1
    for a, b in zip(losses1, losses2):
        assert abs(a["forget"] - b["forget"]) < 1e-5 * max(1.0, abs(a["forget"]))
        assert abs(a["retain"] - b["retain"]) < 1e-4 * max(1.0, abs(a["retain"])) + 1e-7
    w0 = load_file(tiny_model_dir / "model.safetensors")
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert sorted(w1) == sorted(w2)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-3 and diff < 1e-4 * moved, (diff, moved)  # measured: 6.3e-7 / 1.2e-2 full, 1.1e-6 / 0.14 LoRA
    if adapter == "lora":
        assert (two / "adapter" / "adapter_model.safetensors").is_file()
