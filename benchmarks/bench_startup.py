"""Start-up: seconds from process start to the first forward pass of `qrunlearn eval`, in fresh processes that
write no bytecode (PYTHONDONTWRITEBYTECODE=1, as in most containers), side by side:

    eval              `qrunlearn eval` on a tiny random Llama, as shipped
    eval, hqq/torchao transformers' model code imported first, as any library user gets it (the command line
                      otherwise loads it with hqq and torchao reported absent:
                      `cli.skip_transformers_optional_quantizers`)
    import torch      the floor: the interpreter and torch alone

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3]

The timer is a global forward pre-hook that prints the elapsed time and ends the process at the first forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

WRAPPER = """
import os, sys, time
start = float(os.environ["BENCH_T0"])
import torch
if os.environ.get("BENCH_FLOOR"):
    print(f"ELAPSED {time.time() - start:.3f}", flush=True); os._exit(0)
def first_forward(module, args):
    print(f"ELAPSED {time.time() - start:.3f}", flush=True); os._exit(0)
torch.nn.modules.module.register_module_forward_pre_hook(first_forward)
if os.environ.get("BENCH_PREIMPORT"):
    import transformers.modeling_utils
from qrunlearn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def build_inputs(folder: Path) -> tuple[Path, Path]:
    """A tiny corpus and an untrained tiny Llama (as tests/conftest.py makes them)."""
    from qrunlearn.data.muse import load_corpus, write_corpus
    from qrunlearn.data.synth import SynthConfig, generate_corpus
    from qrunlearn.models.tiny import PRESETS, build_model, train_tokenizer

    data, model_dir = folder / "data", folder / "model"
    write_corpus(generate_corpus(SynthConfig(seed=0, size="tiny")), data)
    corpus = load_corpus(data)
    texts = [t for docs in corpus.raw.values() for t in docs]
    tokenizer = train_tokenizer(texts, vocab_size=PRESETS["tiny"].vocab_target, out_dir=model_dir)
    build_model(PRESETS["tiny"], len(tokenizer), tokenizer, seed=0).save_pretrained(model_dir)
    return data, model_dir


def seconds(args: list[str], env: dict[str, str]) -> float:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env, "BENCH_T0": repr(time.time())}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ELAPSED ")]
    if not lines:
        raise SystemExit(f"no forward reached: {done.stderr[-2000:]}")
    return float(lines[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, model = build_inputs(Path(tmp))
        command = ["eval", "--model", str(model), "--data", str(data), "--out", f"{tmp}/r.json",
                   "--metrics", "knowmem_f"]
        variants = {"eval": ({}, command), "eval, hqq/torchao": ({"BENCH_PREIMPORT": "1"}, command),
                    "import torch": ({"BENCH_FLOOR": "1"}, [])}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(options.repeats):  # interleaved, so a busy spell touches every variant alike
            for name, (env, args) in variants.items():
                times[name].append(seconds(args, env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"seconds to the first forward (median of {options.repeats}, PYTHONDONTWRITEBYTECODE=1):")
    for name, values in times.items():
        print(f"  {name:<20} {medians[name]:6.2f}   ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"eval with hqq/torchao / as shipped: {medians['eval, hqq/torchao'] / medians['eval']:.2f}x; "
          f"as shipped beyond torch's own import: {medians['eval'] - medians['import torch']:.2f} s")


if __name__ == "__main__":
    main()
