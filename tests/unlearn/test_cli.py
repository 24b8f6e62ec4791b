"""`qrunlearn unlearn`: in-process runs, one-line errors, and a 2-process (gloo) DDP run against 1 process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qrunlearn.cli import main

COMMON = ["--defaults", "tiny", "--epochs", "1", "--max-length", "128", "--lr", "1e-3", "--no-progress"]


def test_bad_input_exits_2_with_one_line(tiny_model_dir, tiny_corpus_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_corpus_dir, data)
    (data / "raw" / "retain1.json").unlink()
    code = main(["unlearn", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--reg", "gdr", *COMMON])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and "retain1.json: missing" in err
    code = main(["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--out",
                 str(tmp_path / "o"), "--lora-dropout", "1.5", *COMMON])
    assert code == 2 and "--lora-dropout" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two accelerate processes: ~40 s; .ci/run runs it
def test_two_cpu_processes_match_one_at_the_same_global_batch(tiny_model_dir, tiny_corpus_dir, tmp_path):
    one = tmp_path / "one"
    args = ["unlearn", "--model", str(tiny_model_dir), "--data", str(tiny_corpus_dir), "--method", "npo",
            "--reg", "gdr", *COMMON]
    # one process, global batch 4 as 2 micro-batches of 2 (the same padding widths as the two processes: with
    # Adam, float noise in near-zero gradients would otherwise be amplified into visible weight differences)
    assert main([*args, "--out", str(one), "--batch-size", "2", "--grad-accum", "2"]) == 0

    two = tmp_path / "two"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # --multi_gpu selects accelerate's torchrun launcher; ACCELERATE_USE_CPU makes it a gloo CPU group.
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), "-m", "qrunlearn", *args, "--out", str(two), "--batch-size", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    rec1 = json.loads((one / "unlearn.json").read_text())
    rec2 = json.loads((two / "unlearn.json").read_text())
    assert rec1["num_processes"] == 1 and rec2["num_processes"] == 2
    losses1, losses2 = rec1["progress"]["losses"], rec2["progress"]["losses"]
    assert len(losses1) == len(losses2) > 1
    for a, b in zip(losses1, losses2):
        assert abs(a["forget"] - b["forget"]) < 1e-5 * max(1.0, abs(a["forget"]))
        assert abs(a["retain"] - b["retain"]) < 1e-5 * max(1.0, abs(a["retain"]))
    w1 = load_file(one / "model" / "model.safetensors")
    w2 = load_file(two / "model" / "model.safetensors")
    moved = max((w1[k] - load_file(tiny_model_dir / "model.safetensors")[k]).abs().max().item() for k in w1)
    assert moved > 1e-4  # the comparison below is not between two untouched models
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-3 * moved, (diff, moved)
