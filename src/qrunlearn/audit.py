"""`qrunlearn audit`: will an unlearned model stay unlearned in the formats it ships in?

For every unlearned model U and format F (fp, bf16, int8, nf4, rtn:..., hqq:...), the target T, U (and the retrain
model R) are evaluated at F with MUSE's metrics, and each forgetting metric's precision-matched effect, reversion
and retrain gap come from the same definition and code as `qrunlearn run`'s table (`eval.effect.precision_effect`):

    effect_F = d * (m(U_F) - m(T_F)),   reversion_F = 1 - effect_F / effect_fp   (paired bootstrap over items)

The gate (`--max-reversion r`, on `--gate-metric`, KnowMem-forget by default) is interval-aware, as a release gate
should be: a format *keeps* the forgetting when the whole 95% interval of its reversion lies at or below r, *reverts*
when it lies above, and is *inconclusive* otherwise, which fails unless `--inconclusive pass`. A model with no
measurable forgetting at fp (its effect's interval not above 0) fails: there is nothing to keep. Exit 0 when every
(model, format) keeps, 1 when one does not (named), 2 on bad input.

Evaluations are cached under `OUT/evals/`, keyed by the model's content (`models.identity`), the format, the corpus
and the evaluation settings: the target's are shared by every unlearned model and by later audits into OUT.

Written to OUT (each file atomically): audit.json (`AuditResult`), audit.md, audit.html (self-contained: the table
and two inline plots, for a CI artifact).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qrunlearn.config import no_repeats
from qrunlearn.data.muse import MuseCorpus, load_corpus
from qrunlearn.errors import UserError
from qrunlearn.eval import EvalConfig, evaluate
from qrunlearn.eval.effect import (
    FORGETTING_METRICS,
    METRIC,
    Estimate,
    PrecisionEffect,
    at_retrain,
    has_items,
    precision_effect,
)
from qrunlearn.eval.relearn import probe_corpus, relearn, relearning_split
from qrunlearn.io import atomic_write_bytes, atomic_write_json, atomic_write_text, git_commit, package_versions, slug
from qrunlearn.models.identity import model_identity
from qrunlearn.models.loading import load_causal_lm, load_tokenizer
from qrunlearn.plotting import figure_png, pyplot
from qrunlearn.quant.registry import load_quantized, require_backend
from qrunlearn.quant.spec import CALIBRATED_METHODS, FULL_PRECISION, QuantSpec, parse_spec
from qrunlearn.results import EvalRecord, Metrics

Gate = Literal["keeps", "reverts", "at retrain", "inconclusive", "no effect", "anchor"]
AUDIT_FORMATS = ("fp", "bf16", "int8", "nf4", "rtn:w4g64")


class AuditConfig(BaseModel):
    """One audit's inputs and settings, written into audit.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    unlearned: tuple[str, ...] = Field(min_length=1)
    retrain: str | None = None
    retrain_auc: float | None = Field(None, gt=0.0, le=1.0)
    data: str
    formats: tuple[QuantSpec, ...] = Field(tuple(parse_spec(f) for f in AUDIT_FORMATS), min_length=1)
    max_reversion: float = Field(0.1, gt=0.0, lt=1.0)
    gate_metric: str = "knowmem_f"
    inconclusive: Literal["fail", "pass"] = "fail"
    eval: EvalConfig = EvalConfig()
    seed: int = 0
    relearn_steps: int = Field(0, ge=0, description="the relearning probe's optimizer steps (0: no probe)")
    relearn_lr: float = Field(1e-5, gt=0.0)
    relearn_batch_size: int = Field(4, ge=1)

    @field_validator("formats")
    @classmethod
    def _fp_first_and_distinct(cls, formats: tuple[QuantSpec, ...]) -> tuple[QuantSpec, ...]:
        no_repeats(formats)
        # fp is the anchor every reversion is relative to: always evaluated, and first
        return (FULL_PRECISION, *[f for f in formats if not f.is_noop])

    @field_validator("gate_metric")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        if name not in METRIC:
            raise ValueError(f"unknown metric '{name}' (choose from {', '.join(METRIC)})")
        return name


class AuditRow(BaseModel):
    """One model at one format: its metrics and, for unlearned models, the precision-matched figures and the gate."""

    model: str  # "target", "retrain" or the unlearned model's path
    label: str = ""  # as the table and plots name it: the shortest path suffix that tells the models apart
    format: str
    metrics: Metrics
    effects: dict[str, PrecisionEffect] = Field(default_factory=dict)
    utility_change: float | None = None  # KnowMem-retain minus the target's at the same format (points)
    gate: Gate | None = None
    reason: str = ""


class RelearnRecord(BaseModel):
    """One model relearned on half the forget subjects, probed on the other half (`eval.relearn`)."""

    model: str
    label: str = ""
    steps: int
    by_subject: bool
    probed_questions: int
    probed_subjects: list[str]
    before: Metrics  # on the probed questions
    after: Metrics
    recovery: dict[str, PrecisionEffect]  # per forgetting metric: the share of the forgetting relearning gave back


class AuditResult(BaseModel):
    config: AuditConfig
    rows: list[AuditRow]
    relearning: list[RelearnRecord] = Field(default_factory=list)
    passed: bool
    failures: list[str]
    evaluations: int  # evaluations run by this audit (the rest came from the cache)
    cached: int
    wall_seconds: float
    versions: dict[str, str | None]  # None: not installed here
    git_commit: str | None


# ---- evaluation, cached ---------------------------------------------------------------------------------------
def _corpus_key(data: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in data.rglob("*.json") if p.is_file()):
        digest.update(str(path.relative_to(data)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Evaluator:
    """Evaluates models at formats, each (model content, format, corpus, settings) once, kept in `cache`."""

    def __init__(self, corpus: MuseCorpus, data: Path, settings: EvalConfig, cache: Path,
                 report: Callable[[str], None], variant: str = ""):
        self.corpus, self.settings, self.cache, self.report = corpus, settings, cache, report
        self.context = json.dumps({"corpus": _corpus_key(data), "eval": settings.model_dump(mode="json"),
                                   "variant": variant}, sort_keys=True)
        self.run = self.cached = 0

    def _path(self, model: str, spec: QuantSpec) -> Path:
        key = hashlib.sha256(f"{model_identity(model)}|{spec.label}|{self.context}".encode()).hexdigest()[:20]
        return self.cache / f"{slug(Path(model).name)}-{slug(spec.label)}-{key}.json"

    def __call__(self, model: str, spec: QuantSpec, retrain_auc: float | None) -> EvalRecord:
        path = self._path(model, spec)
        if path.is_file():
            self.cached += 1
            record = EvalRecord.model_validate_json(path.read_text())
        else:
            self.report(f"evaluating {model} at {spec.label}")
            # GPTQ and AWQ calibrate on the retain documents, as `qrunlearn quantize --data` does
            loaded, tokenizer = (load_causal_lm(model) if spec.is_noop
                                 else load_quantized(model, spec, calibration_texts=self.corpus.raw.get("retain1")))
            record = self.evaluate_loaded(loaded, tokenizer)
            del loaded
            gc.collect()
            atomic_write_json(path, record)
            self.run += 1
        return record.fill_privleak(retrain_auc)

    def evaluate_loaded(self, model, tokenizer) -> EvalRecord:
        """A model in memory (a relearned one), not cached."""
        started = time.perf_counter()
        result = evaluate(model, tokenizer, self.corpus, self.settings, progress=False)
        return EvalRecord.of(result, time.perf_counter() - started)


# ---- the gate -------------------------------------------------------------------------------------------------
def gate(anchor_effect: Estimate | None, reversion: Estimate | None, max_reversion: float,
         inconclusive: str, retrain_gap: Estimate | None = None, direction: int = -1) -> tuple[Gate, bool]:
    """(the verdict, whether it passes) for one unlearned model at one quantized format. *At retrain* (passes): the
    model at this format is measurably no less forgotten than the retrain model at it, whatever the share says (the
    floor of a bounded metric, `eval.effect.verdict`)."""
    if anchor_effect is None or anchor_effect.excludes(0.0) != "above":
        return "no effect", False
    if at_retrain(retrain_gap, direction):
        return "at retrain", True
    if reversion is None or reversion.low is None or reversion.high is None:
        return "inconclusive", inconclusive == "pass"
    if reversion.high <= max_reversion:
        return "keeps", True
    if reversion.low > max_reversion:
        return "reverts", False
    return "inconclusive", inconclusive == "pass"


def _check_compatible(target: str, others: list[str]) -> None:
    """Same architecture and vocabulary as the target, or a one-line error naming the model."""
    def signature(model: str) -> dict[str, object]:
        from qrunlearn.models.source import resolve_model_path

        config_path = resolve_model_path(model) / "config.json"
        if not config_path.is_file():
            raise UserError(f"{model}: no config.json (not a model folder)")
        config = json.loads(config_path.read_text())
        return {key: config.get(key) for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers")}

    wanted = signature(target)
    vocabulary = load_tokenizer(target).get_vocab()
    for model in others:
        found = signature(model)
        differing = [key for key in wanted if wanted[key] != found[key]]
        if differing:
            key = differing[0]
            raise UserError(f"{model}: its {key} ({found[key]}) differs from the target's ({wanted[key]}); an "
                            f"audit compares models of one architecture and tokenizer")
        other = load_tokenizer(model).get_vocab()
        if other != vocabulary:
            moved = sum(vocabulary.get(token) != index for token, index in other.items())
            raise UserError(f"{model}: its tokenizer differs from the target's ({moved} of {len(other)} tokens map to "
                            f"other ids); an audit compares models of one tokenizer")


def _check_formats(target: str, formats: tuple[QuantSpec, ...], corpus: MuseCorpus) -> None:
    """Every format's backend is installed and fits the model (group sizes, llama.cpp's architectures, calibration
    text), before anything is evaluated."""
    from qrunlearn.models.gguf_export import check_exportable
    from qrunlearn.quant.common import check_group_divides
    from qrunlearn.unlearn.memory import meta_model

    model = meta_model(target)
    for spec in formats:
        require_backend(spec)
        check_group_divides(model, spec.row_group, spec.label)
        if spec.method in CALIBRATED_METHODS:
            corpus.require_raw("retain1")
        if spec.method == "gguf":
            check_exportable(model)


def run_audit(config: AuditConfig, out: Path, report: Callable[[str], None] = print) -> AuditResult:
    started = time.perf_counter()
    models = [config.target, *config.unlearned] + ([config.retrain] if config.retrain else [])
    _check_compatible(config.target, models[1:])
    corpus = load_corpus(config.data)
    _check_formats(config.target, config.formats, corpus)
    evaluator = Evaluator(corpus, Path(config.data), config.eval, out / "evals", report)
    retrain_auc = config.retrain_auc
    retrain_evals: dict[str, EvalRecord] = {}
    if config.retrain is not None:
        retrain_evals[FULL_PRECISION.label] = evaluator(config.retrain, FULL_PRECISION, retrain_auc)
        retrain_auc = retrain_auc or retrain_evals[FULL_PRECISION.label].metrics.privleak_auc
        retrain_evals[FULL_PRECISION.label].fill_privleak(retrain_auc)
    target_evals = {f.label: evaluator(config.target, f, retrain_auc) for f in config.formats}
    if config.retrain is not None:
        retrain_evals = {f.label: retrain_evals.get(f.label) or evaluator(config.retrain, f, retrain_auc)
                         for f in config.formats}
    references = (("target", target_evals), ("retrain", retrain_evals))
    rows = [AuditRow(model=name, format=label, metrics=record.metrics)
            for name, evals in references for label, record in evals.items()]
    failures: list[str] = []
    headline = METRIC[config.gate_metric]
    anchor = FULL_PRECISION.label
    for model in config.unlearned:
        evals = {f.label: evaluator(model, f, retrain_auc) for f in config.formats}
        fp_effect: Estimate | None = None
        for spec in config.formats:
            label = spec.label
            effects = {}
            for metric in FORGETTING_METRICS:
                parts = (target_evals[label].items, evals[label].items, target_evals[anchor].items, evals[anchor].items)
                if not all(has_items(metric, p) for p in parts):
                    continue
                retrain = retrain_evals[label].items if label in retrain_evals else None
                effects[metric.name] = precision_effect(
                    metric, parts[0], [parts[1]],  # type: ignore[list-item, arg-type]
                    None if label == anchor else parts[2], None if label == anchor else [parts[3]],  # type: ignore
                    retrain if has_items(metric, retrain) else None, config.eval.bootstrap, config.seed)
            utility = evals[label].metrics.knowmem_r
            target_utility = target_evals[label].metrics.knowmem_r
            row = AuditRow(model=model, format=label, metrics=evals[label].metrics, effects=effects,
                           utility_change=utility - target_utility
                           if utility is not None and target_utility is not None else None)
            if label == anchor:  # the formats start with fp (AuditConfig puts it first)
                row.gate = "anchor"
                fp_effect = effects[headline.name].effect if headline.name in effects else None
            else:
                found = effects.get(headline.name)
                reversion = found.reversion if found is not None else None
                gap = found.retrain_gap if found is not None else None
                row.gate, passed = gate(fp_effect, reversion, config.max_reversion, config.inconclusive, gap,
                                        headline.direction)
                row.reason = _reason(row.gate, headline.label, fp_effect, reversion, config.max_reversion, gap)
                if not passed:
                    failures.append(f"{model} at {label}: {row.reason}")
            rows.append(row)
    labels = short_names(list(config.unlearned))
    for row in rows:
        row.label = labels.get(row.model, row.model)
    relearning, probe = _relearning(config, corpus, evaluator, report) if config.relearn_steps else ([], None)
    for record in relearning:
        record.label = labels.get(record.model, record.model)
    result = AuditResult(config=config, rows=rows, relearning=relearning, passed=not failures, failures=failures,
                         evaluations=evaluator.run + (probe.run if probe else 0),
                         cached=evaluator.cached + (probe.cached if probe else 0),
                         wall_seconds=time.perf_counter() - started,
                         versions=package_versions(), git_commit=git_commit())
    write_outputs(result, out)
    return result


def _relearning(config: AuditConfig, corpus: MuseCorpus, evaluator: Evaluator,
                report: Callable[[str], None]) -> tuple[list[RelearnRecord], Evaluator]:
    """Each unlearned model (and the retrain model, the baseline) relearned on half the forget subjects, its
    recovery measured on the other half's questions against the target."""
    split = relearning_split(corpus, config.seed)
    variant = json.dumps({"probe": [[q.question, q.answer] for q in split.probe_questions]})
    probe = Evaluator(probe_corpus(corpus, split), Path(config.data),
                      config.eval.model_copy(update={"metrics": ("knowmem_f",)}), evaluator.cache, report, variant)
    target = probe(config.target, FULL_PRECISION, None)
    records = []
    for model in [*config.unlearned, *([config.retrain] if config.retrain else [])]:
        before = probe(model, FULL_PRECISION, None)
        report(f"relearning {model} for {config.relearn_steps} steps on {len(split.relearn_documents)} documents")
        loaded, tokenizer = load_causal_lm(model)
        relearn(loaded, tokenizer, split, config.relearn_steps, config.relearn_lr, config.relearn_batch_size,
                seed=config.seed)
        after = probe.evaluate_loaded(loaded, tokenizer)
        del loaded
        gc.collect()
        recovery = {}
        for metric in FORGETTING_METRICS:
            if all(has_items(metric, r.items) for r in (target, before, after)):
                recovery[metric.name] = precision_effect(
                    metric, target.items, [after.items],  # type: ignore[arg-type, list-item]
                    target.items, [before.items],  # type: ignore[list-item]
                    resamples=config.eval.bootstrap, seed=config.seed)
        records.append(RelearnRecord(model="retrain" if model == config.retrain else model,
                                     steps=config.relearn_steps, by_subject=split.by_subject,
                                     probed_questions=len(split.probe_questions), probed_subjects=split.probe_subjects,
                                     before=before.metrics, after=after.metrics, recovery=recovery))
    return records, probe


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest trailing part that no other path ends with: 'runs/a/unlearn/model' and
    'runs/b/unlearn/model' -> 'a/unlearn/model', 'b/unlearn/model'."""
    parts = {path: Path(path).parts for path in paths}
    names = {}
    for path, mine in parts.items():
        for length in range(1, len(mine) + 1):
            suffix = mine[-length:]
            if all(other[-length:] != suffix for p, other in parts.items() if p != path):
                break
        names[path] = "/".join(suffix)
    return names


def _reason(verdict: Gate, metric: str, fp_effect: Estimate | None, reversion: Estimate | None,
            max_reversion: float, retrain_gap: Estimate | None = None) -> str:
    if verdict == "no effect":
        value = f"{fp_effect.value:.2f} {_interval(fp_effect)}" if fp_effect and fp_effect.value is not None else "-"
        return f"no measurable {metric} forgetting at fp ({value}): nothing to keep"
    share = f"{reversion.value:.2f} {_interval(reversion)}" if reversion and reversion.value is not None else "-"
    if verdict == "keeps":
        return f"{metric} reversion {share}: interval at or below {max_reversion:g}"
    if verdict == "at retrain" and retrain_gap is not None and retrain_gap.value is not None:
        return (f"{metric} minus the retrain model's {retrain_gap.value:.2f} {_interval(retrain_gap)}: as forgotten "
                f"as the retrain model at this format (reversion {share})")
    if verdict == "reverts":
        return f"{metric} reversion {share}: interval above {max_reversion:g}"
    return f"{metric} reversion {share}: interval straddles {max_reversion:g}"


def _interval(estimate: Estimate) -> str:
    return f"[{estimate.low:.2f}, {estimate.high:.2f}]" if estimate.low is not None and estimate.high is not None \
        else "[no interval]"


# ---- outputs ----------------------------------------------------------------------------------------------------
def _cell(estimate: Estimate | None) -> str:
    if estimate is None or estimate.value is None:
        return "-"
    return f"{estimate.value:.2f} {_interval(estimate)}"


def table_markdown(result: AuditResult) -> str:
    metric = METRIC[result.config.gate_metric]
    # beside the gated metric, the reversion of the one most likely to show an effect at small scale
    other = METRIC["knowmem_f" if metric.name == "nll_privleak_forget" else "nll_privleak_forget"]
    header = ["model", "format", "KnowMem-forget", "Utility", "forget NLL", f"forgetting {metric.label}",
              f"reversion {metric.label}", f"reversion {other.label}", "utility vs target", "gate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        m = row.metrics
        effect = row.effects.get(metric.name)
        nll = row.effects.get(other.name)
        values = [row.label or row.model, row.format, _num(m.knowmem_f), _num(m.knowmem_r),
                  _num(m.nll_privleak_forget, 3),
                  _cell(effect.effect if effect else None), _cell(effect.reversion if effect else None),
                  _cell(nll.reversion if nll else None),
                  f"{row.utility_change:+.1f}" if row.utility_change is not None else "-", row.gate or "-"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def relearning_markdown(result: AuditResult) -> str:
    if not result.relearning:
        return ""
    first = result.relearning[0]
    how = (f"relearned on the forget documents about half the subjects, probed on the other "
           f"{len(first.probed_subjects)} subjects' {first.probed_questions} questions" if first.by_subject else
           f"relearned on half the forget documents (the corpus names no subjects: not disjoint), probed on all "
           f"{first.probed_questions} questions")
    lines = [f"## Relearning: {first.steps} steps at lr {result.config.relearn_lr:g}, {how}", "",
             "| model | KnowMem-forget before | after | recovery KnowMem-forget | recovery answer NLL |",
             "|---|---|---|---|---|"]
    for record in result.relearning:
        know, nll = record.recovery.get("knowmem_f"), record.recovery.get("knowmem_f_answer_nll")
        lines.append(f"| {record.label or record.model} | {_num(record.before.knowmem_f)} | "
                     f"{_num(record.after.knowmem_f)} | {_cell(know.reversion if know else None)} | "
                     f"{_cell(nll.reversion if nll else None)} |")
    note = ("Recovery: the share of each model's forgetting of the probed questions (against the target) that "
            "relearning gave back; the retrain model, relearned the same way, is the baseline.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _plots(result: AuditResult) -> list[bytes]:
    """Forget vs utility per format, and the gate metric's reversion with its interval per (model, format)."""
    plt = pyplot()
    images = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result.rows:
        if row.metrics.knowmem_f is None or row.metrics.knowmem_r is None:
            continue
        ax.scatter(row.metrics.knowmem_r, row.metrics.knowmem_f, marker="s" if row.model == "target" else
                   "^" if row.model == "retrain" else "o")
        ax.annotate(f"{row.label or row.model}@{row.format}", (row.metrics.knowmem_r, row.metrics.knowmem_f),
                    fontsize=6)
    ax.set_xlabel("Utility (KnowMem-retain)")
    ax.set_ylabel("KnowMem-forget")
    ax.set_title("forget vs utility, per format")
    images.append(figure_png(fig, dpi=100))
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = result.config.gate_metric
    shown = [r for r in result.rows if r.gate not in (None, "anchor") and metric in r.effects
             and r.effects[metric].reversion is not None]
    for index, row in enumerate(shown):
        rev = row.effects[metric].reversion
        assert rev is not None
        if rev.low is not None and rev.high is not None and rev.value is not None:
            ax.errorbar([index], [rev.value], yerr=[[rev.value - rev.low], [rev.high - rev.value]], fmt="o")
        elif rev.value is not None:
            ax.plot([index], [rev.value], "o")
    ax.axhline(result.config.max_reversion, linestyle="--", color="grey")
    ax.set_xticks(range(len(shown)), [f"{r.label or r.model}@{r.format}" for r in shown], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel(f"reversion ({METRIC[metric].label}), 95% interval")
    images.append(figure_png(fig, dpi=100))
    return images


def write_outputs(result: AuditResult, out: Path) -> None:
    table = table_markdown(result)
    verdict = "PASS" if result.passed else "FAIL"
    summary = [f"# Audit: {verdict}", "",
               f"Gate: the {METRIC[result.config.gate_metric].label} reversion's 95% interval at or below "
               f"{result.config.max_reversion:g} in every quantized format (inconclusive counts as "
               f"{result.config.inconclusive}).", ""]
    summary += [f"- {failure}" for failure in result.failures] + ([""] if result.failures else [])
    atomic_write_json(out / "audit.json", result)
    relearning = relearning_markdown(result)
    body = "\n".join(summary) + "\n" + table + ("\n" + relearning if relearning else "")
    atomic_write_text(out / "audit.md", body)
    images = "".join(f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     for png in _plots(result))
    rows_html = "".join("<li>" + html.escape(f) + "</li>" for f in result.failures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>qrunlearn audit: {verdict}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:48%;margin:1em 1%}</style></head><body>"
            f"<h1>Audit: {verdict}</h1><p>{html.escape(summary[2])}</p><ul>{rows_html}</ul>"
            f"{_html_table(table)}{_html_relearning(relearning)}{images}</body></html>")
    atomic_write_bytes(out / "audit.html", page.encode())


def _html_relearning(markdown: str) -> str:
    if not markdown:
        return ""
    title, _, rest = markdown.partition("\n\n")
    table, _, note = rest.partition("\n\n")
    return f"<h2>{html.escape(title.lstrip('# '))}</h2>{_html_table(table)}<p>{html.escape(note.strip())}</p>"


def _html_table(markdown: str) -> str:
    lines = [line for line in markdown.strip().splitlines() if not line.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
