"""`lorakit eval`: loss and perplexity on a split, generation metrics, and a pairwise-judge check."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import (
    ChatTemplateOpt,
    ConfigOpt,
    DebugOpt,
    DtypeOpt,
    JsonOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    QGroupSizeOpt,
    QuantizeOpt,
    QuietOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TemplateOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    opt,
)
from lorakit.settings import EvalSettings as S

if TYPE_CHECKING:
    from lorakit.engine.eval import EvalResult
    from lorakit.engine.reporter import Reporter


EXAMPLE = "lorakit eval -m M --data data/support --adapter-path runs/s --compare-base"


def command(
    ctx: typer.Context,
    model: ModelOpt = None,
    data: Annotated[Path | None, opt(S, "data")] = None,
    split: Annotated[str | None, opt(S, "split")] = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    compare_base: Annotated[bool | None, opt(S, "compare_base")] = None,
    batch_size: Annotated[int | None, opt(S, "batch_size")] = None,
    max_seq_length: Annotated[int | None, opt(S, "max_seq_length")] = None,
    train_on: Annotated[str | None, opt(S, "train_on")] = None,
    generate: Annotated[bool | None, opt(S, "generate")] = None,
    prompt_delimiter: Annotated[str | None, opt(S, "prompt_delimiter")] = None,
    chat_template: ChatTemplateOpt = None,
    template: TemplateOpt = None,
    judge: Annotated[bool | None, opt(S, "judge")] = None,
    judge_template: Annotated[str | None, opt(S, "judge_template")] = None,
    label_pattern: Annotated[str | None, opt(S, "label_pattern")] = None,
    labels: Annotated[str | None, opt(S, "labels")] = None,
    ignore_case: Annotated[bool | None, opt(S, "ignore_case")] = None,
    limit: Annotated[int | None, opt(S, "limit")] = None,
    seed: SeedOpt = None,
    out: Annotated[Path | None, opt(S, "out")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    max_tokens: MaxTokensOpt = None,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    stop: StopOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    quantize: QuantizeOpt = None,
    q_group_size: QGroupSizeOpt = None,
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Measure a model (and what an adapter changed) on a data split: loss, generations, judge verdicts."""
    run_command("eval", ctx.params, _run, _render, _summary, _hint)


def _run(settings: S, reporter: Reporter) -> EvalResult:
    from lorakit.engine import eval as engine

    return engine.run(settings, reporter)


def _summary(result: EvalResult, reporter: Reporter) -> None:
    """Every model's headline metrics side by side, with the change (stderr)."""
    from lorakit.engine.eval import headline

    names = list(result.results)
    flat = {n: headline(result.results[n]) for n in names}
    rows = []
    for key in flat[names[-1]]:
        row = [key, *[f"{flat[n][key]:.4f}" if key in flat[n] else "-" for n in names]]
        if key in result.change:
            row.append(f"{result.change[key]:+.4f}")
        rows.append(tuple(row))
    header = ("metric", *names, *(("change",) if result.change else ()))
    reporter.table(f"eval: {result.split} ({result.examples} examples)", rows, header)
    reporter.log(f"prompts: {result.rendering['description']}")


def _hint(result: EvalResult) -> str:
    """A run's report shows the evals inside it (eval-*); one written elsewhere is named too."""
    paths = [p for p in ((result.adapter or {}).get("path"), result.out) if p is not None]
    if len(paths) == 2 and Path(paths[0]).resolve() in Path(paths[1]).resolve().parents:
        paths = paths[:1]
    return f"see it: lorakit report {' '.join(shlex.quote(str(p)) for p in paths)}"


def _render(result: EvalResult, settings: S) -> None:
    """One line of headline metrics per model, the change, and where the outputs are (stdout)."""
    from lorakit.cli.reporting import out_console
    from lorakit.engine.eval import headline

    console = out_console()
    for name, metrics in result.results.items():
        shown = "  ".join(f"{key.removeprefix('loss.')}={value:.4g}" for key, value in headline(metrics).items())
        console.print(f"{name}: {shown}")
    for key, value in result.change.items():
        console.print(f"change {key}: {value:+.4g}")
    console.print(f"wrote {result.out}/eval.json and {result.out}/predictions.jsonl")
