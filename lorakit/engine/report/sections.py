"""The report's sections, each from what gather.py read: runs, curves, data, tokens, evals, samples.

Every function returns the section's HTML (page.section) or "" when it has nothing to show.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from lorakit.engine.report.charts import loss_series, short_model_name
from lorakit.engine.report.gather import DataInfo, EvalInfo, RunInfo
from lorakit.engine.report.page import bars, change_cell, num, section, table
from lorakit.engine.report.svg import COLORS, Series, histogram, line_chart
from lorakit.engine.report.tokens import TokenView


def _summary(run: RunInfo) -> dict[str, Any]:
    """report.json, or what metrics.jsonl says of a run that has none (still going, or stopped by Ctrl-C)."""
    if run.report:
        return run.report
    val = run.series("val_loss")
    best = min(val[1:], key=lambda p: p[1]) if len(val) > 1 else None
    train = run.series("train_loss")
    return {"steps": max((r.get("iteration", 0) for r in run.metrics), default=0), "epochs": None,
            "initial_val_loss": val[0][1] if val and val[0][0] == 0 else None,
            "best_val_loss": best[1] if best else None, "best_step": best[0] if best else None,
            "final_train_loss": train[-1][1] if train else None, "tokens_per_second": None,
            "wall_time_s": run.metrics[-1].get("elapsed") if run.metrics else None, "unfinished": True}


def _adapter_eval(run: RunInfo) -> str:
    for ev in run.evals:
        adapter = ev.summary.get("results", {}).get("adapter", {}).get("loss", {})
        if "loss" in adapter:
            change = ev.summary.get("change", {}).get("loss.loss")
            return f"{num(adapter['loss'])} ({ev.summary.get('split')})" + (
                f" {change_cell('loss.loss', change)}" if change is not None else "")
    return "\u2013"


def runs_section(runs: list[RunInfo]) -> str:
    """One row per run: what was trained, how, and how it went (a comparison table for several)."""
    if not runs:
        return ""
    rows = []
    for run in runs:
        s, r = run.settings, _summary(run)
        steps = f"{r.get('steps')}" + (f" ({r['epochs']:g} ep)" if r.get("epochs") else "")
        steps += " <span class='tag no'>unfinished</span>" if r.get("unfinished") else ""
        best = (f"{num(r.get('initial_val_loss'))} \u2192 {num(r.get('best_val_loss'))} @ {r.get('best_step')}"
                if r.get("best_val_loss") is not None else "\u2013")
        wall = r.get("wall_time_s")
        rows.append([f'<span title="{escape(str(run.path))}">{escape(run.name)}</span>',
                     escape(short_model_name(str(s.get("model", "?")))),
                     escape(f"{s.get('fine_tune_type', '?')} r{s.get('lora_rank', '?')} "
                            f"\u03b1{s.get('lora_alpha', '?')}"),
                     escape(f"{s.get('optimizer', '?')} {s.get('learning_rate', '?')} "
                            f"{s.get('lr_schedule', '')}"),
                     steps, best, num(r.get("final_train_loss")), num(r.get("tokens_per_second"), 5),
                     num(round(wall, 1) if isinstance(wall, (int, float)) else None), _adapter_eval(run)])
    header = ["run", "model", "method", "optimizer, lr", "steps", "val loss: start \u2192 best @ step",
              "train loss", "tokens/s", "time (s)", "eval loss (change)"]
    body = table(header, rows, {6, 7, 8})
    body += "".join(_settings_details(run) for run in runs)
    return section("runs", "Runs" if len(runs) == 1 else f"Runs compared ({len(runs)})", body)


def _settings_details(run: RunInfo) -> str:
    rows = [[escape(str(k)), escape(str(v))] for k, v in run.settings.items()]
    return (f"<details><summary>settings of {escape(run.name)} (lorakit.yaml)</summary>"
            f"{table(['setting', 'value'], rows)}</details>")


def curves_section(runs: list[RunInfo]) -> str:
    """Train and validation loss (best step marked) and the learning rate, the runs overlaid."""
    runs = [r for r in runs if r.metrics]
    if not runs:
        return ""
    several = len(runs) > 1
    series, marks = [], []
    for i, run in enumerate(runs):
        best = _summary(run).get("best_step")
        s, m = loss_series(run.series("train_loss"), run.series("val_loss"), best,
                           prefix=f"{run.name}: " if several else "", color=i)
        series += s
        marks += m
    title = "loss" if several else f"loss: {short_model_name(str(runs[0].settings.get('model', '')))}"
    loss = line_chart(series, title=title, x_label="step", y_label="loss", marks=marks, width=720)
    lr = line_chart([Series(run.name, run.series("learning_rate"), COLORS[i % len(COLORS)], dots=False)
                     for i, run in enumerate(runs)], title="learning rate", x_label="step",
                    y_label="learning rate", width=720, height=300)
    note = ('<p class="note">Solid: training loss (mean over the steps since the previous point); dashed: '
            "validation loss. Hover a point for its value.</p>")
    return section("curves", "Loss and learning rate", f'{note}<div class="charts">{loss}{lr}</div>')


def data_section(datasets: list[DataInfo]) -> str:
    """Per data directory: examples per split, formats, labels, length statistics and histogram."""
    if not datasets:
        return ""
    parts = []
    for data in datasets:
        manifest = data.manifest or {}
        labels = manifest.get("labels") or {}
        rows = [[split, num(n), escape(", ".join(f"{k}={v}" for k, v in (labels.get(split) or {}).items()))]
                for split, n in {**data.counts, **({"rejected": manifest["counts"].get("rejected", 0)}
                                                   if "counts" in manifest else {})}.items()]
        parts.append(f"<h3>{escape(str(data.path))}</h3>")
        parts.append(table(["split", "examples", "labels" + (f" ({manifest['label_field']})"
                                                             if manifest.get("label_field") else "")], rows, {1}))
        parts.append(f"<p>formats: {escape(', '.join(f'{k} {v}' for k, v in data.formats.items()))}</p>")
        parts.append(_lengths(data, manifest))
    return section("data", "Data", "\n".join(parts))


def _lengths(data: DataInfo, manifest: dict[str, Any]) -> str:
    stats = [[unit, *(num(v.get(k)) for k in ("min", "mean", "p50", "p95", "max"))]
             for unit, v in (manifest.get("lengths") or {}).items() if v]
    out = table(["length", "min", "mean", "p50", "p95", "max"], stats, {1, 2, 3, 4, 5}) if stats else ""
    rejected = manifest.get("rejected") or {}
    if rejected:
        out += "<h3>rejected records</h3>" + bars({str(k): int(v) if isinstance(v, int) else len(v)
                                                   for k, v in rejected.items()}, "#fda29b")
    note = " (the first records of each split)" if data.partial else ""
    chart = histogram({k: [float(v) for v in vs] for k, vs in data.chars.items() if vs},
                      title=f"characters per example{note}", x_label="characters (message contents or text)",
                      width=720)
    return out + f'<div class="charts">{chart}</div>'


def tokens_section(views: list[TokenView], notes: list[str]) -> str:
    """Examples token by token; the tokens that carry loss are highlighted."""
    if not views and not notes:
        return ""
    parts = [('<p class="note"><span class="swatch" style="background:#d1fadf">highlighted</span> tokens carry '
              "loss (the model is trained to predict them); grey ones are context only. <i>Italic</i>: special "
              "tokens. Hover a token for its id.</p>")]
    parts += [f'<p class="note">{escape(n)}</p>' for n in notes]
    for view in views:
        parts.append(f"<h3>{escape(view.run)}: {escape(view.data)}/train.jsonl, as {escape(short_model_name(view.model))}"
                     f" tokenises it (format {escape(view.format)}, --train-on {escape(view.train_on)})</h3>")
        for ex in view.examples:
            shown = sum(len(t.ids) for t in ex.tokens)
            more = f", the first {shown} shown" if shown < ex.total else ""
            where = f"line {ex.line}: " if ex.line else ""
            parts.append(f"<p>{where}{ex.total} tokens, {ex.loss_tokens} carry loss "
                         f"({100 * ex.loss_tokens / max(ex.total, 1):.0f}%){more}</p>")
            spans = "".join(f'<span class="{("loss " if t.loss else "") + ("special" if t.special else "")}" '
                            f'title="{" ".join(map(str, t.ids))}">{escape(_visible(t.text))}</span>'
                            for t in ex.tokens)
            parts.append(f'<div class="tokens">{spans}</div>')
    return section("tokens", "Which tokens carry loss", "\n".join(parts))


def _visible(text: str) -> str:
    return text.replace("\n", "\u21b5\n").replace("\t", "\u2192\t")


def evals_section(evals: list[tuple[str, EvalInfo]]) -> str:
    """Per eval: every metric for base and adapter with the change; judge bias; confusion matrices."""
    if not evals:
        return ""
    parts = []
    for name, ev in evals:
        s = ev.summary
        results, change = s.get("results", {}), s.get("change", {})
        models = list(results)
        parts.append(f"<h3>{escape(name)}: split {escape(str(s.get('split')))}, {num(s.get('examples'))} of "
                     f"{num(s.get('split_examples'))} examples</h3>")
        if (s.get("rendering") or {}).get("description"):
            parts.append(f'<p class="note">prompts: {escape(s["rendering"]["description"])}</p>')
        rows = []
        for key in _metric_keys(results):
            values = [_lookup(results[m], key) for m in models]
            rows.append([escape(key), *(num(v) for v in values),
                         *([change_cell(key, change.get(key))] if change else [])])
        header = ["metric", *models, *(["change"] if change else [])]
        parts.append(table(header, rows, set(range(1, len(header)))))
        parts += _confusions(results)
    return section("evals", "Evaluation", "\n".join(parts))


def _metric_keys(results: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for result in results.values():
        for part, metrics in result.items():
            for k, v in (metrics or {}).items() if isinstance(metrics, dict) else ():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and f"{part}.{k}" not in keys:
                    keys.append(f"{part}.{k}")
    return keys


def _lookup(result: dict[str, Any], key: str) -> Any:
    part, _, name = key.partition(".")
    return (result.get(part) or {}).get(name)


def _confusions(results: dict[str, Any]) -> list[str]:
    """Confusion matrices (rows: reference, columns: predicted) of labels and judge verdicts."""
    parts = []
    for model, result in results.items():
        found = [("labels", ((result.get("generation") or {}).get("labels") or {}).get("confusion")),
                 ("judge verdicts", (result.get("judge") or {}).get("confusion")),
                 ("judge verdicts, answers swapped", (result.get("judge") or {}).get("confusion_swapped"))]
        for what, matrix in found:
            if matrix:
                parts.append(f"<p><b>{escape(model)}</b>: {escape(what)} (rows: reference, columns: "
                             f"predicted)</p>{_matrix(matrix)}")
        bias = (result.get("judge") or {}).get("bias")
        if bias:
            rows = [[escape(v), num(b.get("predicted")), num(b.get("reference")), num(b.get("difference"))]
                    for v, b in bias.items()]
            parts.append(f"<p><b>{escape(model)}</b>: verdict shares over both answer orders</p>"
                         + table(["verdict", "predicted", "reference", "difference"], rows, {1, 2, 3}))
    return parts


def _matrix(confusion: dict[str, dict[str, int]]) -> str:
    columns = list(next(iter(confusion.values())).keys())
    top = max((c for row in confusion.values() for c in row.values()), default=1) or 1
    rows = []
    for ref, row in confusion.items():
        cells = []
        for pred in columns:
            count = row.get(pred, 0)
            hue = "209,250,223" if pred == ref else "254,228,226"
            alpha = 0.15 + 0.85 * count / top if count else 0
            cells.append(f'<span style="display:block;background:rgba({hue},{alpha:.2f})">{count}</span>')
        rows.append([escape(ref), *cells])
    return table(["reference \\ predicted", *columns], rows, set(range(1, len(columns) + 1)), "heat")


def samples_section(evals: list[tuple[str, EvalInfo]], count: int) -> str:
    """The first `count` examples of each eval that generated: prompt, reference and each model's answer."""
    parts = []
    for name, ev in evals:
        by_index: dict[Any, dict[str, dict]] = {}
        for row in ev.predictions:
            if "output" in row:
                by_index.setdefault(row.get("index"), {})[str(row.get("model"))] = row
        if not by_index or count == 0:
            continue
        models = list(dict.fromkeys(m for rows in by_index.values() for m in rows))
        rows = []
        for index in list(by_index)[:count]:
            first = next(iter(by_index[index].values()))
            rows.append([num(first.get("line")), _div(_prompt_text(first.get("input"))),
                         _div(str(first.get("reference", ""))),
                         *(_answer(by_index[index].get(m)) for m in models)])
        parts.append(f"<h3>{escape(name)} ({min(count, len(by_index))} of {len(by_index)})</h3>")
        parts.append(table(["line", "prompt", "reference", *models], rows, cls="samples"))
    return section("samples", "Generations side by side", "\n".join(parts)) if parts else ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    if isinstance(prompt, dict):
        return "\n\n".join(f"{k}: {v}" for k, v in prompt.items())
    return str(prompt or "")


def _answer(row: dict[str, Any] | None) -> str:
    if row is None:
        return "\u2013"
    verdict = row.get("correct", row.get("exact_match"))
    tags = ""
    if isinstance(verdict, bool):
        tags += f'<span class="tag {"ok" if verdict else "no"}">{"correct" if verdict else "wrong"}</span>'
    if isinstance(row.get("f1"), (int, float)):
        tags += f'<span class="tag">F1 {row["f1"]:.2f}</span>'
    return _div(str(row.get("output", ""))) + tags


def _div(text: str) -> str:
    return f"<div>{escape(text)}</div>"


def eval_name(ev: EvalInfo, run: RunInfo | None = None) -> str:
    """An eval inside its run as run/eval-NAME, any other by its path."""
    inside = run is not None and run.path.resolve() in ev.path.resolve().parents
    return f"{run.name}/{ev.path.name}" if inside else str(Path(ev.path))
