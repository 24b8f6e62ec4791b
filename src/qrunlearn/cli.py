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

# ---- unlearn (issue 4) -----------------------------------------------------------------------------------------

# ---- quantize / survival (issue 5) -----------------------------------------------------------------------------

# ---- run (issue 6) ---------------------------------------------------------------------------------------------


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
