"""The `qrunlearn` command line. Each subcommand is a typed function: its parameters are the options, its
docstring is the `--help` text. The settings of a run (`UnlearnConfig`, `EvalConfig`) become options by
generation from their pydantic fields, so each setting is declared once. User errors print one line
(`error: ...`) and exit with code 2."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from pydantic import BaseModel, ValidationError

from qrunlearn.config import load_config, load_resolved_config
from qrunlearn.errors import UserError, validation_message
from qrunlearn.eval.config import EvalConfig
from qrunlearn.lazy import lazy_module
from qrunlearn.models.source import ModelSource
from qrunlearn.quant.spec import CALIBRATED_METHODS
from qrunlearn.targets.config import BaseTargetConfig
from qrunlearn.unlearn.config import METHOD_HELP, REG_HELP, Method, Reg, UnlearnConfig
from qrunlearn.unlearn.strategy import Strategy


def skip_transformers_optional_quantizers() -> None:
    """Load transformers' model code with hqq and torchao reported absent. transformers imports hqq for a quantized
    KV cache and torchao for torchao-quantized checkpoints, neither of which qrunlearn uses, and their imports pull
    in torch._dynamo and inductor: ~4.5 s of a command's start on 2 busy cores (`benchmarks/bench_startup.py`).
    Only the command line does this (it owns its process); the `hqq:` quantizer imports hqq itself when a spec asks
    for it."""
    if "transformers.modeling_utils" in sys.modules:
        return
    import transformers.utils as hf_utils

    checks = {name: getattr(hf_utils, name) for name in ("is_hqq_available", "is_torchao_available")}
    for name in checks:
        setattr(hf_utils, name, lambda *args, **kwargs: False)
    try:
        import transformers.cache_utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        for name, check in checks.items():
            setattr(hf_utils, name, check)


def stage(name: str) -> Any:
    """A stage that loads models, imported on first use after `skip_transformers_optional_quantizers`."""
    return lazy_module(name, before=skip_transformers_optional_quantizers)


# The stages load on first use (see qrunlearn.lazy): `--help` and usage errors answer at once instead of after
# ~5 s of importing torch, transformers and peft; the data commands never import transformers.
experiment = stage("qrunlearn.experiment")
audit_module = stage("qrunlearn.audit")
eval_run = stage("qrunlearn.eval.run")
hub = lazy_module("qrunlearn.data.hub")
io = lazy_module("qrunlearn.io")
loading = stage("qrunlearn.models.loading")
memory = stage("qrunlearn.unlearn.memory")
muse = lazy_module("qrunlearn.data.muse")
quant = stage("qrunlearn.quant")
recipe = stage("qrunlearn.unlearn.recipe")
stats = lazy_module("qrunlearn.data.stats")
synth = lazy_module("qrunlearn.data.synth")
target_module = stage("qrunlearn.targets.build")
gguf = stage("qrunlearn.models.gguf")
gptq = stage("qrunlearn.quant.gptq")
registry = stage("qrunlearn.quant.registry")

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
models_app = typer.Typer(help="Pretrained models from GGUF files: import as Hugging Face folders, measure the 4-bit "
                              "grid their weights sit on.", no_args_is_help=True)
app.add_typer(models_app, name="models")


# ---- options generated from a settings record -----------------------------------------------------------------
def settings_options(record: type[BaseModel], names: tuple[str, ...],
                     default_note: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per field of `record` in `names` to a command whose last parameter is `**settings`.

    Each option takes the field's type (so typer rejects a bad choice or number) and its description as help;
    it defaults to None, meaning "keep the record's (or the default set's) value", and the command receives
    only the options the user gave."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = []
        for name in names:
            field = record.model_fields[name]
            note = default_note or f"default: {field.default}"
            text = field.description or name
            help_text = f"{text[:1].upper()}{text[1:]} [{note}]"  # str.capitalize() would lower-case "MUSE", "LoRA"
            # a type built at run time from the pydantic field, which a static checker cannot follow
            annotation = Annotated[Optional[field.annotation], typer.Option(help=help_text,  # type: ignore[name-defined]
                                                                            show_default=False)]
            generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                               annotation=annotation))
        params = fixed + generated
        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# A corpus folder must exist: checked while parsing, so a typo is answered before the stage's imports.
CorpusDir = Annotated[Path, typer.Option(exists=True, file_okay=False, help="Corpus folder in MUSE's layout.")]
RetrainDir = Annotated[Optional[Path], typer.Option("--retrain", help="Retrain model folder: its privleak AUC is "
                                                                      "PrivLeak's reference.")]
RetrainAuc = Annotated[Optional[str], typer.Option("--retrain-auc", help="Reference AUC instead of --retrain: a "
                                                                         "number, or news (0.4772) / books (0.5393).")]
MetricNames = Annotated[str, typer.Option("--metrics", help="Comma-separated subset of verbmem_f,knowmem_f,knowmem_r,"
                                                            "privleak.")]
ALL_METRICS = "verbmem_f,knowmem_f,knowmem_r,privleak"


def metric_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def check_models(**options: str | Path | None) -> None:
    """Reject a model option naming a folder that holds no loadable model, before the stage is imported; the
    error names the option (`check_models(model=path)` -> "--model: <path>: ...")."""
    for name, value in options.items():
        if value is None:
            continue
        try:
            ModelSource(str(value)).check()
        except UserError as err:
            raise UserError(f"--{name.replace('_', '-')}: {err}") from None


def parse_method(spec: str) -> Any:
    """The `--method` quantization spec, parsed; a bad one names the option."""
    try:
        return quant.parse_spec(spec)
    except UserError as err:
        raise UserError(f"--method: {err}") from None


def build_settings(record: type[BaseModel], base: dict[str, Any], given: dict[str, Any]) -> Any:
    """`record` from `base` overlaid with the options the user gave; a bad value names its option."""
    try:
        return record.model_validate({**base, **{k: v for k, v in given.items() if v is not None}})
    except ValidationError as err:
        raise UserError(validation_message(err, option_style=True)) from None


# ---- data -----------------------------------------------------------------------------------------------------
@data_app.command("check")
def data_check(
    data_dir: Annotated[Path, typer.Argument(help="A corpus folder in MUSE's layout.")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (folder or hub id) for token-length "
                                                          "stats.")] = None,
) -> None:
    """Validate a MUSE-layout folder; print item counts, character (and token) length stats and which file each
    document split was read from."""
    corpus = muse.load_corpus(data_dir)
    tok = loading.load_tokenizer(tokenizer) if tokenizer is not None else None
    typer.echo(stats.format_stats(stats.corpus_stats(corpus, tok)))
    for line in muse.describe_sources(corpus):
        typer.echo(line)
    typer.echo(f"ok: {data_dir} is a valid MUSE corpus")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the corpus to (MUSE layout).")],
    seed: Annotated[int, typer.Option(help="Generator seed: same seed, byte-identical files.")] = 0,
    size: Annotated[Literal["tiny", "small", "medium"], typer.Option(help="World size (tiny is for tests).")] = "small",
) -> None:
    """Generate the built-in benchmark: a fictional news world in MUSE's full layout."""
    corpus = synth.generate_corpus(synth.SynthConfig(seed=seed, size=size))
    muse.write_corpus(corpus, out)
    counts = corpus.summary()
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("fetch")
def data_fetch(
    dataset: Annotated[str, typer.Argument(help="Hub dataset id, e.g. muse-bench/MUSE-News or muse-bench/MUSE-Books.")],
    out: Annotated[Path, typer.Option(help="Folder to write the corpus to (MUSE layout).")],
) -> None:
    """Download a MUSE corpus from the Hugging Face hub into a local folder (needs network)."""
    hub.export_hub_corpus(dataset, out)
    typer.echo(f"wrote {out}")


# ---- models ---------------------------------------------------------------------------------------------------
@models_app.command("import")
def models_import(
    gguf_file: Annotated[Path, typer.Argument(help="A GGUF file (llama.cpp's format), e.g. SmolLM2's Q4_1.")],
    out: Annotated[Path, typer.Option(help="Folder to write (atomically): fp32 safetensors, config, tokenizer.")],
    jitter: Annotated[float, typer.Option(min=0.0, help="Move each Q4_1 block-linear weight off its grid by uniform "
                                                        "noise of +- jitter * d / 2 (1 = the whole bin).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the jitter noise.")] = 0,
) -> None:
    """Import a GGUF checkpoint as a standard Hugging Face folder (dequantized to fp32), with qrunlearn_gguf.json
    recording the source file, its sha256, the architecture, the parameter count and the on-grid share."""
    gguf.import_gguf(gguf_file, out, jitter=jitter, seed=seed)
    record = gguf.read_import_record(out)
    grid = "no Q4_1 block linear layers" if record.on_grid_share is None else \
        f"{record.on_grid_share:.6f} of Q4_1 block-linear weights on their grid (jitter {record.jitter:g})"
    typer.echo(f"wrote {out}: {record.architecture}, {record.parameters:,} parameters; {grid}")


@models_app.command("grid")
def models_grid(
    model: Annotated[Path, typer.Option(help="Model folder (e.g. an imported, fine-tuned or unlearned one) or a "
                                             ".gguf file.")],
    gguf_file: Annotated[Path, typer.Option("--gguf", help="The GGUF file the model's weights came from.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the per-layer shares as JSON.")] = None,
) -> None:
    """Share of the model's block-linear weights still exactly on the Q4_1 grid of the GGUF they came from
    (per layer and overall): 1 right after import, about 0 after --jitter 1."""
    loaded, _ = loading.load_causal_lm(model, dtype="float32", device="cpu", with_tokenizer=False)
    share = gguf.q4_1_grid_share(loaded, gguf_file)
    typer.echo(share.summary())
    if out is not None:
        io.atomic_write_json(out, share)
        typer.echo(f"wrote {out}")


# ---- target / retrain models ----------------------------------------------------------------------------------
@app.command("target")
@settings_options(BaseTargetConfig, tuple(n for n in BaseTargetConfig.model_fields if n not in ("base", "seed")),
                  default_note="with --base")
def target(
    data: Annotated[Path, typer.Option(exists=True, file_okay=False,
                                       help="Corpus folder (MUSE layout) with raw/forget and raw/retain1.")],
    out: Annotated[Path, typer.Option(help="Output folder; gets target/ and retrain/ (and tokenizer/ from scratch).")],
    base: Annotated[Optional[str], typer.Option(help="A pretrained causal LM (folder, hub id or .gguf) to fine-tune "
                                                     "instead of training the built-in tiny Llama.")] = None,
    size: Annotated[Literal["tiny", "small"], typer.Option(help="Tiny model preset (without --base).")] = "small",
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs (without --base; default: "
                                                              "preset).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even when a cached checkpoint matches.")] = False,
    **settings: Any,
) -> None:
    """Make the target (trained on forget + retain1) and retrain (retain1 only) models of a corpus.

    Without --base: the built-in tiny Llama, trained from scratch. With --base: a pretrained model fine-tuned with
    its own tokenizer until its KnowMem-forget exact match reaches --threshold (the retrain gets as many epochs);
    every epoch's KnowMem is printed and kept. Cached: the same data, settings and seed reuse finished models."""
    if base is None:
        given = [name for name, value in settings.items() if value is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')}: only with --base (the fine-tune of a pretrained model)")
        config = target_module.TargetConfig(size=size, seed=seed, epochs=epochs)
    else:
        config = build_settings(BaseTargetConfig, {"base": base, "seed": seed}, settings)
    result = target_module.build_target_and_retrain(data, out, config, force=force)
    for name, built in result.items():
        typer.echo(f"{name}: {built.path} ({built.status})")
        for row in built.knowledge:
            typer.echo(f"  epoch {row.epoch}: loss {row.loss:.3f}  KnowMem exact match forget {row.em_forget} "
                       f"retain {row.em_retain}  (ROUGE {row.knowmem_f} / {row.knowmem_r})")


# ---- eval -----------------------------------------------------------------------------------------------------
# every evaluation setting but the metrics (a comma-separated option of its own)
EVAL_OPTIONS = tuple(name for name in EvalConfig.model_fields if name != "metrics")


@app.command("eval")
@settings_options(EvalConfig, EVAL_OPTIONS)
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model folder (a Hugging Face causal LM with safetensors + tokenizer, "
                                             "or a folder qrunlearn wrote: unlearn/quantize --out, a run cell) or a "
                                             ".gguf file.")],
    data: CorpusDir,
    out: Annotated[Path, typer.Option(help="Results JSON; per-item logs go beside it as <stem>.items.jsonl.")],
    retrain: RetrainDir = None,
    retrain_auc: RetrainAuc = None,
    metrics: MetricNames = ALL_METRICS,
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"],
                     typer.Option(help="Weights dtype (auto: fp32 CPU, bf16 CUDA).")] = "auto",
    **settings: Any,
) -> None:
    """MUSE evaluation: VerbMem, KnowMem (forget, retain), PrivLeak, plus MIA AUCs, batched. A folder written by
    `qrunlearn quantize` is evaluated quantized."""
    config = build_settings(EvalConfig, {"metrics": metric_names(metrics)}, settings)
    check_models(model=model, retrain=retrain)
    result = eval_run.eval_folder(model, data, out, config, retrain_path=retrain, retrain_auc=retrain_auc,
                                  dtype=dtype)
    typer.echo(eval_run.format_summary(result))
    typer.echo(f"wrote {out} ({result.timings['total']:.1f}s)")


# ---- unlearn --------------------------------------------------------------------------------------------------
UNLEARN_OPTIONS = tuple(name for name in UnlearnConfig.model_fields if name not in ("method", "reg", "strategy",
                                                                                     "stop_knowmem_f"))


@app.command("unlearn")
@settings_options(UnlearnConfig, UNLEARN_OPTIONS, default_note="default: from --defaults")
def unlearn_command(
    model: Annotated[str, typer.Option(help="Model to unlearn from (HF folder, a folder qrunlearn wrote, a .gguf "
                                            "file or a hub id).")],
    data: Annotated[Path, typer.Option(exists=True, file_okay=False,
                                       help="Corpus folder (MUSE layout) with raw/<forget-split> (and retain).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder: model/ (merged for LoRA), adapter/, "
                                                      "unlearn.json. Required unless --estimate.")] = None,
    method: Annotated[Method, typer.Option(help="Forget objective: " + METHOD_HELP + ".")] = "ga",
    reg: Annotated[Reg, typer.Option(help="Retain term: " + REG_HELP + ".")] = "gdr",
    strategy: Annotated[str, typer.Option(help="Which weights move and what is added: full, lora, sure, quail, "
                                               "qat:SPEC, lora+qat:SPEC; settings after a colon, e.g. "
                                               "sure:percentile=90, lora+qat:nf4:mix=0.5, quail:rtn:w4g64:weight=2 "
                                               "(the grid's strategies, the same text).")] = "full",
    defaults: Annotated[Literal["paper", "tiny"], typer.Option(help="Default set: the paper's (real models) or "
                                                                    "the built-in tiny model's.")] = "paper",
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run in --out (or reuse a finished one).")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print the predicted memory per process and exit "
                                                              "(nothing is trained; the model config is read, "
                                                              "not its weights).")] = False,
    processes: Annotated[int, typer.Option(min=0, help="With --estimate: the number of processes to plan for "
                                                       "(0: this launch's).")] = 0,
    **settings: Any,
) -> None:
    """Unlearn a forget set: GA / NPO / SimNPO / WGA / SatImp / UNDIAL / IdkDPO / RMU with a GDR / KLR retain term
    (RMU: its own, act), full FT or LoRA (merged), and SURE / QUAIL / quantization-aware strategies on top.

    Runs through accelerate: `accelerate launch --num_processes N -m qrunlearn unlearn ...` trains with DDP
    (or the FSDP / DeepSpeed setup of your accelerate config); --batch-size is per process. On CPUs:
    `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m qrunlearn unlearn ...` (gloo)."""
    if settings.get("lora_targets"):  # accept --lora-targets q_proj,v_proj as well as repeated options
        settings["lora_targets"] = [t.strip() for item in settings["lora_targets"] for t in item.split(",")
                                    if t.strip()]
    try:
        chosen = Strategy.parse(strategy)
    except UserError as err:
        raise UserError(f"--strategy: {err}") from None
    base = UnlearnConfig.defaults(defaults, method, reg, chosen).model_dump()
    config = build_settings(UnlearnConfig, base, settings)
    corpus = muse.load_corpus(data)
    if estimate:  # a folder with only a config.json is enough (e.g. configs/llama-2-7b): no weights are read
        world = processes or int(os.environ.get("WORLD_SIZE", "1"))
        shape = memory.micro_batch_shape(model, corpus, config)
        typer.echo(memory.estimate_memory(model, config, world, shape.length if shape else None,
                                          loading.default_device().type, rows=shape.rows if shape else None).describe())
        return
    check_models(model=model)
    if out is None:
        raise UserError("--out: missing (the folder to write the unlearned model to)")
    result = recipe.unlearn(model, corpus, config, out, progress=progress, resume=resume)
    typer.echo(f"{result.stopped_reason}: {result.epochs_run} epoch(s); model {result.model_dir}"
               + (f", adapter {result.adapter_dir}" if result.adapter_dir else ""))


# ---- quantize / survival --------------------------------------------------------------------------------------
@app.command("quantize")
def quantize(
    model: Annotated[Path, typer.Option(help="Full-precision HF model folder (safetensors), a folder qrunlearn "
                                             "wrote around one (unlearn --out, a run cell), or a .gguf file.")],
    method: Annotated[str, typer.Option(help="Spec: fp, bf16, rtn:w4g64 / rtn:w8 (per-channel) / rtn:w4g64:sym, "
                                             "nf4, fp4, int8, hqq:w4g64, gptq:w4g128, awq:w4g128 (bits 2-8; hqq "
                                             "2/3/4/8), gguf:q4_k_m (any llama.cpp type: q8_0, q6_k, q5_k_m, "
                                             "q3_k_m, iq4_xs, f32 ...).")],
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).")],
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    data: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False,
                                                 help="GPTQ / AWQ only: corpus whose retain1 calibrates.")] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="GPTQ / AWQ only: calibration documents (first N, in "
                                                           "order).")] = 128,
    seed: Annotated[int, typer.Option(help="GPTQ / AWQ only: calibration seed.")] = 0,
) -> None:
    """Quantize every linear layer in the transformer blocks (embeddings and lm_head stay full precision), or, for
    gguf:TYPE, the whole model by llama.cpp's own rules.

    bitsandbytes (nf4/fp4/int8), GPTQ and AWQ write a quantized HF folder; gguf:TYPE writes model.gguf (llama.cpp's
    file, run by `qrunlearn eval` in llama.cpp; `make llamacpp`); RTN and HQQ write the full-precision weights plus
    qrunlearn_quant.json, and `load_quantized` re-applies the spec on load. A group size must divide every quantized
    layer's input width (error otherwise, naming the layer)."""
    spec = parse_method(method)
    check_models(model=model)
    registry.require_backend(spec)
    calibration = None
    if spec.method in CALIBRATED_METHODS:
        if data is None:
            raise UserError(f"{spec.method} needs calibration data: pass --data DIR (a corpus with raw/retain1)")
        calibration = gptq.Calibration(texts=tuple(muse.load_corpus(data).require_raw("retain1")),
                                       tokenizer=loading.load_tokenizer(model), n_samples=calib_samples, seed=seed)
    typer.echo(quant.save_quantized(model, spec, out, device=device, calibration=calibration))


@app.command("survival")
def survival(
    base: Annotated[Path, typer.Option(help="The model before unlearning (HF folder).")],
    unlearned: Annotated[Path, typer.Option(help="The unlearned model (full FT or merged LoRA; HF folder).")],
    method: Annotated[str, typer.Option(help="Quantization spec, e.g. rtn:w4g64, nf4, int8, hqq:w4g64.")],
    out: Annotated[Optional[Path], typer.Option(help="Report JSON; a per-layer PNG is written beside it.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """How much of the unlearning update (unlearned - base) survives quantization, per layer and overall:
    relative error ||dQ - dW||/||dW||, mean |dW| in quantization steps, share of codes changed (and, for older
    results, projection sum(dQ*dW)/sum(dW^2) and cosine(dQ, dW))."""
    spec = parse_method(method)
    check_models(base=base, unlearned=unlearned)
    base_model, _ = loading.load_causal_lm(base, device=device, with_tokenizer=False)
    unlearned_model, _ = loading.load_causal_lm(unlearned, device=device, with_tokenizer=False)
    report = quant.survival_report(base_model, unlearned_model, spec)
    report.metadata = io.run_metadata({"base": str(base), "unlearned": str(unlearned), "spec": spec.label}, None)
    typer.echo(report.verdict)
    if out is not None:
        io.atomic_write_json(out, report)
        png = quant.plot_survival(report, out.with_suffix(".png"))
        typer.echo(f"wrote {out} and {png}")


# ---- run / report ---------------------------------------------------------------------------------------------
@app.command("run")
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment YAML (default: the built-in benchmark "
                                                          "grid).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for data, models, cells and the report.")] = Path(
        "runs/demo"),
    resume: Annotated[bool, typer.Option(help="Continue a non-empty output folder, skipping finished "
                                              "cells.")] = False,
    force: Annotated[bool, typer.Option(help="Redo every cell, its unlearning run included, even if it is "
                                             "finished.")] = False,
    cell: Annotated[Optional[int], typer.Option(min=0, help="Run only cell N (0 = reference models) for a scheduler "
                                                            "array.")] = None,
    prepare: Annotated[bool, typer.Option(help="Only build data and target/retrain models (before a --cell "
                                               "array).")] = False,
    list_cells: Annotated[bool, typer.Option("--list-cells", help="Print the cells of the grid and exit.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print each unlearning cell's predicted memory per "
                                                              "process and exit (needs models.target or "
                                                              "models.base; only its config.json is read).")] = False,
    processes: Annotated[int, typer.Option(min=1, help="With --estimate: processes to plan for.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show the live progress display.")] = True,
) -> None:
    """Run the paper's grid: unlearn each (method, adapter), evaluate target, retrain and every cell at every
    precision, compute survival diagnostics, and write results.json, table.md/.csv, plots/ and report.md."""
    experiment_config = load_config(config)
    if list_cells:
        for item in experiment.plan_cells(experiment_config):
            typer.echo(f"{item.index}\t{item.id}")
        return
    if estimate:
        model = experiment_config.models.target or experiment_config.models.base
        if model is None:
            raise UserError("--estimate: the config names no model (models.target or models.base); the built-in "
                            "tiny Llama needs well under 1 GiB")
        for item in experiment.plan_cells(experiment_config)[1:]:
            cell_config = experiment_config.unlearn_config(item.method, item.strategy, item.seed)
            typer.echo(f"{item.id}: " + memory.estimate_memory(model, cell_config, processes, None,
                                                                loading.default_device().type).describe())
        return
    folder = experiment.run_experiment(experiment_config, out, resume=resume, force=force, cell_index=cell,
                            prepare_only=prepare, progress=progress)
    table = folder / "table.md"
    if table.exists() and cell is None and not prepare:
        typer.echo(table.read_text())
        typer.echo(f"report: {folder / 'report.md'}")


@app.command("report")
def report(
    out: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="An experiment output folder.")],
    config: Annotated[Optional[Path], typer.Option(help="The experiment YAML it ran (default: the config the run "
                                                         "recorded in OUT/config.resolved.json, else the built-in "
                                                         "benchmark's).")] = None,
    partial: Annotated[bool, typer.Option("--partial", help="Report the cells finished so far (the references cell "
                                                            "must be) into OUT/partial/, while a long grid runs; "
                                                            "its rows pool only the seeds finished.")] = False,
) -> None:
    """Rebuild table.md, table.csv, plots and report.md from an experiment folder's finished cells."""
    experiment_config = (load_config(config) if config is not None
                         else load_resolved_config(out) or load_config(None))
    finished = experiment.Experiment(experiment_config, out)
    where, results = finished.report(partial)
    typer.echo((where / "table.md").read_text())
    if partial:
        typer.echo(f"partial: {len(results.cells)} of {len(finished.cells) - 1} unlearning cells ({where})")


# ---- audit ----------------------------------------------------------------------------------------------------
@app.command("audit")
@settings_options(EvalConfig, EVAL_OPTIONS)
def audit(
    target: Annotated[Path, typer.Option(help="The model before unlearning (a model folder).")],
    unlearned: Annotated[list[Path], typer.Option(help="An unlearned model folder; repeat for several.")],
    data: CorpusDir,
    out: Annotated[Path, typer.Option(help="Output folder: audit.json, audit.md, audit.html, evals/ (the cache).")],
    retrain: RetrainDir = None,
    retrain_auc: RetrainAuc = None,
    formats: Annotated[str, typer.Option(help="Comma-separated formats to ship in (quantization specs: fp, bf16, int8, "
                                              "nf4, fp4, rtn:w4g64, hqq:w4g64, gguf:q4_k_m (llama.cpp: make "
                                              "llamacpp), gptq:w4g64 / awq:w4g64 (from .venv-gptq) ...); fp is "
                                              "always the anchor.")
                       ] = "fp,bf16,int8,nf4,rtn:w4g64",
    max_reversion: Annotated[float, typer.Option(help="The share of the forgetting a format may give back: it keeps "
                                                      "when the reversion's whole 95% interval is at or below "
                                                      "this.")] = 0.1,
    gate_metric: Annotated[str, typer.Option(help="The forgetting metric the gate reads: knowmem_f, verbmem_f, "
                                                  "knowmem_f_answer_nll, nll_privleak_forget, privleak_auc.")
                           ] = "knowmem_f",
    inconclusive: Annotated[Literal["fail", "pass"], typer.Option(help="What an interval straddling "
                                                                        "--max-reversion counts as.")] = "fail",
    metrics: MetricNames = ALL_METRICS,
    relearn: Annotated[int, typer.Option(min=0, help="The relearning probe: fine-tune each model (and the retrain "
                                                     "model, the baseline) for this many steps on the forget "
                                                     "documents about half the subjects, then ask the other half's "
                                                     "questions (0: no probe).")] = 0,
    relearn_lr: Annotated[float, typer.Option(help="The relearning probe's lr (AdamW, constant).")] = 1e-5,
    progress: Annotated[bool, typer.Option(help="Print each evaluation as it starts.")] = True,
    **settings: Any,
) -> int:
    """Will an unlearned model stay unlearned where it ships? Every model at every format with MUSE's metrics, the
    precision-matched reversion with its 95% interval (as `qrunlearn run`'s table), the utility cost, and a gate:
    exit 0 when every format keeps the forgetting within --max-reversion, 1 when one does not (named), 2 on bad
    input. The target's evaluations are cached in OUT/evals and shared across models and audits."""
    check_models(target=target, retrain=retrain)
    for model in unlearned:
        check_models(unlearned=model)
    specs = []
    for text in (part.strip() for part in formats.split(",") if part.strip()):
        try:
            specs.append(quant.parse_spec(text))
        except UserError as err:
            raise UserError(f"--formats: {err}") from None
    eval_config = build_settings(EvalConfig, {"metrics": metric_names(metrics)}, settings)
    config = audit_module.AuditConfig(
        target=str(target), unlearned=tuple(str(m) for m in unlearned), retrain=str(retrain) if retrain else None,
        retrain_auc=eval_run.parse_retrain_auc(retrain_auc) if retrain_auc is not None else None, data=str(data),
        formats=tuple(specs),
        max_reversion=max_reversion, gate_metric=gate_metric, inconclusive=inconclusive, eval=eval_config,
        seed=eval_config.seed, relearn_steps=relearn, relearn_lr=relearn_lr)
    result = audit_module.run_audit(config, out, report=typer.echo if progress else (lambda _message: None))
    typer.echo((out / "audit.md").read_text())
    typer.echo(f"wrote {out / 'audit.json'}, audit.md, audit.html ({result.evaluations} evaluations run, "
               f"{result.cached} from the cache, {result.wall_seconds:.0f} s)")
    return 0 if result.passed else 1


# ---- entry point ----------------------------------------------------------------------------------------------
def configure_logging() -> None:
    """Quiet what is noise for a command-line user; the library itself configures nothing on import."""
    # peft imports torchao when it is installed; on a CPU-only torch, torchao logs that its CUDA kernels cannot
    # load, torch logs pytree deprecations and bitsandbytes that an optional kernel package is absent.
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft asks transformers whether gradient checkpointing is on through a name transformers 5 deprecated; the
    # warning repeats on every LoRA run and is not actionable.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _is_usage_error(err: BaseException) -> bool:
    """Typer's and click's usage errors, wherever the installed typer keeps them (typer >= 0.29 vendors click as
    `typer._click`; older versions raise click's own classes): matched by class name, not by module."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"ClickException", "UsageError", "TyperException"}) and hasattr(err, "format_message")


def _one_line(text: str) -> str:
    return " ".join(text.split())


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def _interrupted() -> int:
    print("interrupted", file=sys.stderr)
    return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C exits 130."""
    configure_logging()
    try:
        code = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        return _interrupted()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except ValidationError as err:
        print(f"error: {validation_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM):
            raise
        where = f"{err.filename}: " if err.filename else ""  # qrunlearn's own writes always name their file
        print(f"error: {where}{err.strerror}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare `qrunlearn` or `qrunlearn data`: the help
            print(err.format_message())  # type: ignore[attr-defined]
            return 0
        if _is_usage_error(err):
            print(f"error: {_one_line(err.format_message())}", file=sys.stderr)  # type: ignore[attr-defined]
            return 2
        if type(err).__name__ in ("Abort", "Exit"):
            if isinstance(err.__context__, KeyboardInterrupt):  # typers on plain click raise Ctrl-C as Abort
                return _interrupted()
            return int(getattr(err, "exit_code", 1))
        raise
    # Outside standalone mode typer >= 0.29 does not raise on Ctrl-C: it catches the KeyboardInterrupt and returns
    # 130 (the commands themselves return None, so a 130 here is always a Ctrl-C).
    if code == INTERRUPTED:
        return _interrupted()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
