"""What `lorakit report` shows, read from disk: prepared data directories, training runs and eval outputs.

A PATH is recognised by its files: a run has metrics.jsonl, report.json or adapter_config.json; an eval output
has eval.json; prepared data has manifest.json or train.jsonl. A run brings along the data it was trained on
(`data` in its lorakit.yaml) and the eval outputs inside it; an eval output brings its data. Paths recorded
relative to where a command ran are looked up from the current directory, then beside the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import UserError

SPLITS = ("train", "valid", "test")
MAX_RECORDS = 20_000  # per split, for the length histograms


@dataclass
class DataInfo:
    path: Path
    manifest: dict[str, Any] | None
    counts: dict[str, int]  # records per split file
    chars: dict[str, list[int]]  # characters per example (message contents, or the text), per split
    formats: dict[str, int]
    partial: bool = False  # a split longer than MAX_RECORDS: the histogram shows its first records


@dataclass
class EvalInfo:
    path: Path
    summary: dict[str, Any]  # eval.json
    predictions: list[dict[str, Any]]


@dataclass
class RunInfo:
    path: Path
    settings: dict[str, Any]  # lorakit.yaml
    report: dict[str, Any] | None  # report.json (absent while the run goes on, or after a Ctrl-C)
    metrics: list[dict[str, Any]]
    adapter_config: dict[str, Any] | None
    data: Path | None
    evals: list[EvalInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(row["iteration"], row[key]) for row in self.metrics
                if isinstance(row.get(key), (int, float)) and isinstance(row.get("iteration"), int)]


@dataclass
class Inputs:
    runs: list[RunInfo] = field(default_factory=list)
    data: list[DataInfo] = field(default_factory=list)
    evals: list[EvalInfo] = field(default_factory=list)  # given on their own (a run's are in run.evals)
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"PATH {path.parent}: cannot read {path.name} ({e})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"PATH {path.parent}: cannot read {path.name} ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_lines(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """JSON lines as objects; a line that does not parse (cut off by a killed run) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def recorded_path(value: Any, beside: Path) -> Path | None:
    """A path a command recorded: as given (from here), else relative to `beside`; None if neither exists."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    for candidate in (path, beside / path):
        if candidate.exists():
            return candidate
    return None


def kind_of(path: Path) -> str:
    """run, eval or data; a UserError names PATH when it is none of them."""
    if not path.exists():
        raise UserError(f"PATH {path}: not found")
    if path.is_file() and path.name in ("eval.json", "metrics.jsonl", "report.json", "manifest.json"):
        path = path.parent
    files = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if files & {"metrics.jsonl", "report.json", "adapter_config.json"}:
        return "run"
    if "eval.json" in files:
        return "eval"
    if files & {"manifest.json", "train.jsonl"}:
        return "data"
    raise UserError(f"PATH {path}: not a training run (metrics.jsonl, adapter_config.json), an eval output "
                    "(eval.json) or prepared data (manifest.json, train.jsonl)")


def example_chars(record: dict[str, Any]) -> int:
    """Characters of an example as prepare counts them: message contents, prompt + completion, or text."""
    if isinstance(record.get("messages"), list):
        return sum(len(str(m.get("content") or "")) for m in record["messages"] if isinstance(m, dict))
    if "prompt" in record or "completion" in record:
        return len(str(record.get("prompt") or "")) + len(str(record.get("completion") or ""))
    return len(str(record.get("text") or ""))


def _format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "chat"
    return "completions" if "prompt" in record else "text" if "text" in record else "other"


def read_data(path: Path) -> DataInfo:
    manifest = _read_json(path / "manifest.json") if (path / "manifest.json").is_file() else None
    counts, chars, formats, partial = {}, {}, {}, False
    for split in SPLITS:
        file = path / f"{split}.jsonl"
        if not file.is_file():
            continue
        rows = _read_lines(file, MAX_RECORDS)
        with open(file, "rb") as f:
            counts[split] = sum(1 for line in f if line.strip())
        partial = partial or counts[split] > len(rows)
        chars[split] = [example_chars(r) for r in rows]
        for r in rows:
            formats[_format(r)] = formats.get(_format(r), 0) + 1
    if manifest and isinstance(manifest.get("formats"), dict):
        formats = manifest["formats"]  # the raw input formats, before prepare normalised them
    return DataInfo(path, manifest, counts, chars, formats, partial)


def read_eval(path: Path) -> EvalInfo:
    return EvalInfo(path, _read_json(path / "eval.json"), _read_lines(path / "predictions.jsonl"))


def read_run(path: Path) -> RunInfo:
    settings = _read_yaml(path / "lorakit.yaml")
    report = _read_json(path / "report.json") if (path / "report.json").is_file() else None
    config = _read_json(path / "adapter_config.json") if (path / "adapter_config.json").is_file() else None
    evals = [read_eval(p.parent) for p in sorted(path.glob("*/eval.json"))]
    return RunInfo(path, settings, report, _read_lines(path / "metrics.jsonl"), config,
                   recorded_path(settings.get("data"), path.parent), evals)


def gather(paths: list[Path]) -> Inputs:
    """Every PATH read, with the data its runs and evals name (each directory once)."""
    inputs, seen = Inputs(), set()
    data_dirs: list[Path] = []
    for given in paths:
        kind = kind_of(given)
        path = given.parent if given.is_file() else given
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if kind == "run":
            run = read_run(path)
            inputs.runs.append(run)
            seen.update(e.path.resolve() for e in run.evals)
            _want_data(inputs, data_dirs, run.data, run.settings.get("data"), path)
        elif kind == "eval":
            ev = read_eval(path)
            inputs.evals.append(ev)
            _want_data(inputs, data_dirs, recorded_path(ev.summary.get("data"), path.parent.parent),
                       ev.summary.get("data"), path)
        else:
            data_dirs.append(path)
    _attach_evals(inputs)
    unique = list({p.resolve(): p for p in data_dirs}.values())
    inputs.data = [read_data(p) for p in unique]
    return inputs


def _attach_evals(inputs: Inputs) -> None:
    """An eval given on its own joins the run whose adapter it evaluated (when that run is a PATH too); one
    the run brought along already is dropped."""
    runs = {r.path.resolve(): r for r in inputs.runs}
    in_runs = {e.path.resolve() for r in inputs.runs for e in r.evals}
    alone = []
    for ev in inputs.evals:
        adapter = recorded_path((ev.summary.get("adapter") or {}).get("path"), ev.path.parent)
        if ev.path.resolve() in in_runs:
            continue
        if adapter is not None and adapter.resolve() in runs:
            runs[adapter.resolve()].evals.append(ev)
        else:
            alone.append(ev)
    inputs.evals = alone


def _want_data(inputs: Inputs, data_dirs: list[Path], found: Path | None, recorded: Any, where: Path) -> None:
    if found is not None:
        data_dirs.append(found)
    elif recorded:
        inputs.notes.append(f"{where}: its data directory {recorded} was not found (from here or beside it); "
                            "give it as a PATH to show it")
