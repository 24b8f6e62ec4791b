"""The `qrunlearn` command line. Each subcommand is a typed function: its parameters are the options,
its docstring is the `--help` text. User errors print one line (`error: ...`) and exit with code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from qrunlearn.errors import UserError

app = typer.Typer(
    name="qrunlearn",
    help="Quantization-robust LLM unlearning: unlearn (GA/NPO/SimNPO; full FT or LoRA), merge, quantize, "
    "and evaluate with MUSE's metrics at every precision.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="MUSE-layout data: validate a folder, or generate the built-in benchmark.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


# ---- data (issue 2) -------------------------------------------------------------------------------------------
@data_app.command("check")
def data_check(
    data_dir: Annotated[Path, typer.Argument(help="A corpus folder in MUSE's layout.")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (folder or hub id) for token-length stats.")] = None,
) -> None:
    """Validate a MUSE-layout folder; print item counts and character (and token) length stats."""
    from qrunlearn.data.stats import corpus_stats, format_stats
    from qrunlearn.data.muse import load_corpus

    corpus = load_corpus(data_dir)
    tok = None
    if tokenizer is not None:
        from qrunlearn.models.loading import load_tokenizer

        tok = load_tokenizer(tokenizer)
    typer.echo(format_stats(corpus_stats(corpus, tok)))
    typer.echo(f"ok: {data_dir} is a valid MUSE corpus")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the corpus to (MUSE layout).")],
    seed: Annotated[int, typer.Option(help="Generator seed: same seed, byte-identical files.")] = 0,
    size: Annotated[Literal["tiny", "small", "medium"], typer.Option(help="World size (tiny is for tests).")] = "small",
) -> None:
    """Generate the built-in benchmark: a fictional news world in MUSE's full layout."""
    from qrunlearn.data.synth import SynthConfig, generate_corpus
    from qrunlearn.data.muse import write_corpus

    corpus = generate_corpus(SynthConfig(seed=seed, size=size))
    write_corpus(corpus, out)
    counts = corpus.summary()
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("fetch")
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="Hub dataset id, e.g. muse-bench/MUSE-News or muse-bench/MUSE-Books.")],
    out: Annotated[Path, typer.Option(help="Folder to write the corpus to (MUSE layout).")],
) -> None:
    """Download a MUSE corpus from the Hugging Face hub into a local folder (needs network)."""
    from qrunlearn.data.hub import export_hub_corpus

    export_hub_corpus(dataset, out)
    typer.echo(f"wrote {out}")


# ---- target / retrain models (issue 2) -------------------------------------------------------------------------
@app.command("target")
def target(
    data: Annotated[Path, typer.Option(help="Corpus folder (MUSE layout) with raw/forget and raw/retain1.")],
    out: Annotated[Path, typer.Option(help="Output folder; gets tokenizer/, target/ and retrain/.")],
    size: Annotated[Literal["tiny", "small"], typer.Option(help="Model size preset.")] = "small",
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: the preset's).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even when a cached checkpoint matches.")] = False,
) -> None:
    """Train the built-in target (forget + retain1) and retrain (retain1 only) Llamas on a corpus.

    Cached: the same data, config and seed reuse the finished checkpoints."""
    from qrunlearn.models.target import TargetConfig, build_target_and_retrain

    config = TargetConfig(size=size, seed=seed, epochs=epochs)
    result = build_target_and_retrain(data, out, config, force=force)
    for name, info in result.items():
        typer.echo(f"{name}: {info['path']} ({info['status']})")


# ---- eval (issue 3) --------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model folder: a Hugging Face causal LM with safetensors + tokenizer.")],
    data: Annotated[Path, typer.Option(help="Corpus folder in MUSE's layout.")],
    out: Annotated[Path, typer.Option(help="Results JSON; per-item logs go beside it as <stem>.items.jsonl.")],
    retrain: Annotated[Optional[Path], typer.Option(help="Retrain model folder: its privleak AUC is PrivLeak's reference.")] = None,
    retrain_auc: Annotated[Optional[str], typer.Option(help="Reference AUC instead of --retrain: a number, or news (0.4772) / books (0.5393).")] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated subset of verbmem_f,knowmem_f,knowmem_r,privleak.")] = "verbmem_f,knowmem_f,knowmem_r,privleak",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N items of each evaluated file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts (or texts) per batch.")] = 16,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    mia: Annotated[bool, typer.Option(help="Also report LOSS/zlib/Min-K/Min-K++ AUCs (same forward passes).")] = True,
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], typer.Option(help="Weights dtype (auto: fp32 CPU, bf16 CUDA).")] = "auto",
) -> None:
    """MUSE evaluation: VerbMem, KnowMem (forget, retain), PrivLeak, plus MIA AUCs, batched."""
    from qrunlearn.eval.evaluate import EvalConfig
    from qrunlearn.eval.run import eval_folder, format_summary, parse_metrics

    config = EvalConfig(metrics=parse_metrics(metrics), limit=limit, batch_size=batch_size,
                        bootstrap_samples=bootstrap, seed=seed, mia=mia)
    result = eval_folder(model, data, out, config, retrain_path=retrain, retrain_auc=retrain_auc, dtype=dtype)
    typer.echo(format_summary(result))
    typer.echo(f"wrote {out} ({result.timings['total']:.1f}s)")


# ---- unlearn (issue 4) -----------------------------------------------------------------------------------------
@app.command("unlearn")
def unlearn_command(
    model: Annotated[str, typer.Option(help="Model to unlearn from (HF folder or hub id).")],
    data: Annotated[Path, typer.Option(help="Corpus folder (MUSE layout) with raw/<forget-split> (and retain).")],
    out: Annotated[Path, typer.Option(help="Output folder: model/ (merged for LoRA), adapter/, unlearn.json.")],
    method: Annotated[Literal["ga", "npo", "simnpo"], typer.Option(help="Forget objective.")] = "ga",
    reg: Annotated[Literal["none", "gdr", "klr"], typer.Option(help="Retain term: NLL (gdr) or KL to the "
                                                                     "reference (klr).")] = "gdr",
    adapter: Annotated[Literal["full", "lora"], typer.Option(help="Full fine-tuning or LoRA merged at the end.")] = "full",
    defaults: Annotated[Literal["paper", "tiny"], typer.Option(help="Default set: the paper's (real models) or "
                                                                    "the built-in tiny model's.")] = "paper",
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (AdamW, constant).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the forget set.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Forget (and retain) chunks per device per micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per chunk, BOS included.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Retain weight.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Forget weight.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="NPO / SimNPO beta.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="SimNPO margin.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (scale alpha / r).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout.")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="Comma-separated module names (default: every "
                                                              "linear layer but the output head).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (data order, LoRA init, dropout).")] = None,
    save_every_epoch: Annotated[bool, typer.Option(help="Also write epochs/epoch_NNN/ model folders.")] = False,
    forget_split: Annotated[str, typer.Option(help="Raw split to forget.")] = "forget",
    retain_split: Annotated[str, typer.Option(help="Raw split to retain.")] = "retain1",
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run in --out (or reuse a finished one).")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Unlearn a forget set: GA / NPO / SimNPO with a GDR / KLR retain term, full FT or LoRA (merged).

    Runs through accelerate: `accelerate launch --num_processes N -m qrunlearn unlearn ...` trains with DDP
    (or the FSDP / DeepSpeed setup of your accelerate config); --batch-size is per process. On CPUs:
    `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m qrunlearn unlearn ...` (gloo)."""
    from qrunlearn.data.muse import load_corpus
    from qrunlearn.unlearn import UnlearnConfig, unlearn

    base = (UnlearnConfig.paper_defaults if defaults == "paper" else UnlearnConfig.tiny_defaults)(method, reg, adapter)
    given = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "max_length": max_length,
             "alpha": alpha, "gamma": gamma, "beta": beta, "delta": delta, "lora_r": lora_r, "lora_alpha": lora_alpha,
             "lora_dropout": lora_dropout, "seed": seed,
             "lora_targets": [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None}
    updates = {k: v for k, v in given.items() if v is not None}
    updates.update(save_every_epoch=save_every_epoch, forget_split=forget_split, retain_split=retain_split)
    try:
        config = UnlearnConfig.model_validate({**base.model_dump(), **updates})
    except ValueError as err:  # pydantic's ValidationError: name the first bad field in one line
        first = err.errors()[0] if hasattr(err, "errors") else {"loc": ("?",), "msg": str(err)}
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    result = unlearn(model, load_corpus(data), config, out, progress=progress, resume=resume)
    typer.echo(f"{result.stopped_reason}: {result.epochs_run} epoch(s); model {result.model_dir}"
               + (f", adapter {result.adapter_dir}" if result.adapter_dir else ""))


# ---- quantize / survival (issue 5) -----------------------------------------------------------------------------
@app.command("quantize")
def quantize(
    model: Annotated[Path, typer.Option(help="Full-precision HF model folder (safetensors).")],
    method: Annotated[str, typer.Option(help="Spec: fp, rtn:w4g64 / rtn:w8 (per-channel) / rtn:w4g64:sym, nf4, "
                                             "fp4, int8, hqq:w4g64, gptq:w4g128 (bits 2-8; hqq 2/3/4/8).")],
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).")],
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="GPTQ only: corpus folder whose retain1 split calibrates.")] = None,
    calib_samples: Annotated[int, typer.Option(help="GPTQ only: calibration documents (first N, in order).")] = 128,
    seed: Annotated[int, typer.Option(help="GPTQ only: calibration seed.")] = 0,
) -> None:
    """Quantize every linear layer in the transformer blocks (embeddings and lm_head stay full precision).

    bitsandbytes (nf4/fp4/int8) and GPTQ write a quantized HF folder; RTN and HQQ write the full-precision weights
    plus qrunlearn_quant.json, and `load_quantized` re-applies the spec on load. A group size must divide every
    quantized layer's input width (error otherwise, naming the layer)."""
    from qrunlearn.quant import parse_spec, save_quantized
    from qrunlearn.quant.registry import require_backend

    spec = parse_spec(method)
    require_backend(spec)
    calibration = None
    if spec.method == "gptq":
        from qrunlearn.data.muse import load_corpus
        from qrunlearn.models.loading import load_tokenizer
        from qrunlearn.quant.gptq import Calibration

        if data is None:
            raise UserError("gptq needs calibration data: pass --data DIR (a corpus with raw/retain1)")
        texts = tuple(load_corpus(data).require_raw("retain1"))
        calibration = Calibration(texts=texts, tokenizer=load_tokenizer(model), n_samples=calib_samples, seed=seed)
    typer.echo(save_quantized(model, spec, out, device=device, calibration=calibration))


@app.command("survival")
def survival(
    base: Annotated[Path, typer.Option(help="The model before unlearning (HF folder).")],
    unlearned: Annotated[Path, typer.Option(help="The unlearned model (full FT or merged LoRA; HF folder).")],
    method: Annotated[str, typer.Option(help="Quantization spec, e.g. rtn:w4g64, nf4, int8, hqq:w4g64.")],
    out: Annotated[Optional[Path], typer.Option(help="Report JSON; a per-layer PNG is written beside it.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """How much of the unlearning update (unlearned - base) survives quantization, per layer and overall:
    share of codes changed, projection sum(dQ*dW)/sum(dW^2), cosine(dQ, dW), mean |dW| in quantization steps."""
    from qrunlearn.io import atomic_write_json, run_metadata
    from qrunlearn.models.loading import load_causal_lm
    from qrunlearn.quant import parse_spec, plot_survival, survival_report

    spec = parse_spec(method)
    base_model, _ = load_causal_lm(base, device=device, with_tokenizer=False)
    unlearned_model, _ = load_causal_lm(unlearned, device=device, with_tokenizer=False)
    report = survival_report(base_model, unlearned_model, spec)
    report.metadata = run_metadata({"base": str(base), "unlearned": str(unlearned), "spec": spec.label}, None)
    typer.echo(report.verdict)
    if out is not None:
        atomic_write_json(out, report.to_dict())
        png = plot_survival(report, out.with_suffix(".png"))
        typer.echo(f"wrote {out} and {png}")


# ---- run (issue 6) ---------------------------------------------------------------------------------------------
@app.command("run")
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment YAML (default: the built-in benchmark grid).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for data, models, cells and the report.")] = Path("runs/demo"),
    resume: Annotated[bool, typer.Option(help="Continue a non-empty output folder, skipping finished cells.")] = False,
    force: Annotated[bool, typer.Option(help="Redo every cell even if it is finished.")] = False,
    cell: Annotated[Optional[int], typer.Option(help="Run only cell N (0 = reference models) for a scheduler array.")] = None,
    prepare: Annotated[bool, typer.Option(help="Only build data and target/retrain models (before a --cell array).")] = False,
    list_cells: Annotated[bool, typer.Option("--list-cells", help="Print the cells of the grid and exit.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the live progress display.")] = True,
) -> None:
    """Run the paper's grid: unlearn each (method, adapter), evaluate target, retrain and every cell at every
    precision, compute survival diagnostics, and write results.json, table.md/.csv, plots/ and report.md."""
    from qrunlearn.config import load_config
    from qrunlearn.experiment import plan_cells, run_experiment

    experiment_config = load_config(config)
    if list_cells:
        for item in plan_cells(experiment_config):
            typer.echo(f"{item.index}\t{item.id}")
        return
    folder = run_experiment(experiment_config, out, resume=resume, force=force, cell_index=cell,
                            prepare_only=prepare, progress=progress, config_path=config)
    table = folder / "table.md"
    if table.exists() and cell is None and not prepare:
        typer.echo(table.read_text())
        typer.echo(f"report: {folder / 'report.md'}")


@app.command("report")
def report(out: Annotated[Path, typer.Argument(help="An experiment output folder.")],
           config: Annotated[Optional[Path], typer.Option(help="The experiment YAML it ran (default: built-in).")] = None) -> None:
    """Rebuild table.md, table.csv, plots and report.md from an experiment folder's finished cells."""
    from qrunlearn.config import load_config
    from qrunlearn.experiment import Experiment
    from qrunlearn.report import build_report

    experiment = Experiment(load_config(config), out)
    missing = [c.id for c in experiment.cells if not experiment.is_done(c)]
    if missing:
        raise UserError(f"{out}: cells not finished: {', '.join(missing)}")
    build_report(experiment)
    typer.echo((out / "table.md").read_text())



def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            return 2
        if isinstance(err, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
