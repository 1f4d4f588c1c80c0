"""`lorakit report`: one self-contained HTML page about prepared data, training runs and their evals.

    gather.py    read the PATHs: data directories, runs (with their data and eval-* outputs), eval outputs
    tokens.py    the token view: a few training examples tokenised as the run did, loss tokens marked
    svg.py       line charts and histograms (charts.py: the loss chart, which `loss.svg` uses too)
    sections.py  each section's HTML; page.py the document around them (CSS, the error hook, the CSP)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorakit.engine.report.gather import Inputs, gather
from lorakit.engine.report.page import page
from lorakit.engine.report.sections import (
    curves_section,
    data_section,
    eval_name,
    evals_section,
    runs_section,
    samples_section,
    tokens_section,
)
from lorakit.engine.report.tokens import TokenView, Unavailable, token_view
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import check_output_location, write_text
from lorakit.settings import ReportSettings

MAX_TOKEN_VIEWS = 3  # distinct (data, model, --train-on) combinations shown token by token


@dataclass
class ReportResult:
    out: str
    sections: list[str]
    runs: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    evals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run(settings: ReportSettings, reporter: Reporter) -> ReportResult:
    inputs = gather([Path(p) for p in settings.paths])
    out = _check_out(settings)
    for note in inputs.notes:
        reporter.warn(note)
    views, token_notes = _token_views(inputs, settings.examples, reporter)
    evals = [(eval_name(e, r), e) for r in inputs.runs for e in r.evals]
    evals += [(eval_name(e), e) for e in inputs.evals]
    built = [("runs", "runs", runs_section(inputs.runs)),
             ("curves", "curves", curves_section(inputs.runs)),
             ("data", "data", data_section(inputs.data)),
             ("tokens", "loss tokens", tokens_section(views, token_notes)),
             ("evals", "evaluation", evals_section(evals)),
             ("samples", "generations", samples_section(evals, settings.samples))]
    built = [part for part in built if part[2]]
    names = [str(p) for p in settings.paths]
    write_text(out, page(f"lorakit report: {', '.join(Path(n).name or n for n in names)}", names, built))
    return ReportResult(out=str(out), sections=[b[0] for b in built], runs=[str(r.path) for r in inputs.runs],
                        data=[str(d.path) for d in inputs.data], evals=[str(e.path) for _, e in evals],
                        notes=inputs.notes + token_notes)


def _check_out(settings: ReportSettings) -> Path:
    """--out is a file: refused when it is a directory, exists (without --overwrite) or is an input."""
    out = Path(settings.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give the HTML file to write, e.g. {out / 'report.html'}")
    if out.exists() and not settings.overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    check_output_location(out, "--out", [("PATH", p) for p in settings.paths], inside_ok={"PATH"})
    inside = [p for p in settings.paths if Path(p).is_dir() and Path(p).resolve() in out.resolve().parents]
    if inside and out.exists() and out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: would replace a file of the PATH input {inside[0]}; choose another --out "
                        "(a new .html file there is fine)")
    return out


def _token_views(inputs: Inputs, count: int, reporter: Reporter) -> tuple[list[TokenView], list[str]]:
    """A token view per distinct (data, model, --train-on) of the runs; notes say why one is missing."""
    if count == 0:
        return [], []
    views, notes, seen = [], [], set()
    for run in inputs.runs:
        s = run.settings
        key = (run.data.resolve() if run.data else None, s.get("model"), s.get("train_on"))
        if key in seen or len(views) >= MAX_TOKEN_VIEWS:
            continue
        seen.add(key)
        if run.data is None or not (run.data / "train.jsonl").is_file():
            notes.append(f"{run.name}: no token view, its training data was not found")
            continue
        reporter.log(f"token view: {count} examples of {run.data / 'train.jsonl'} with {s.get('model')}'s "
                     "tokenizer")
        try:
            views.append(token_view(run, run.data, count))
        except Unavailable as e:
            notes.append(f"{run.name}: no token view, {e}")
    if not inputs.runs and inputs.data:
        notes.append("no token view: it shows the data as a training run tokenised it; give a run as a PATH")
    for note in notes:
        reporter.log(note)
    return views, notes
