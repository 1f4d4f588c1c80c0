"""`lorakit eval`: loss and perplexity on a split, generation metrics, and a pairwise-judge check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt, run_command
from lorakit.settings import EvalSettings as S


def command(
    model: Annotated[str | None, opt(S, "model")] = None,
    data: Annotated[Path | None, opt(S, "data")] = None,
    split: Annotated[str | None, opt(S, "split")] = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    compare_base: Annotated[bool | None, opt(S, "compare_base")] = None,
    batch_size: Annotated[int | None, opt(S, "batch_size")] = None,
    max_seq_length: Annotated[int | None, opt(S, "max_seq_length")] = None,
    train_on: Annotated[str | None, opt(S, "train_on")] = None,
    generate: Annotated[bool | None, opt(S, "generate")] = None,
    judge: Annotated[bool | None, opt(S, "judge")] = None,
    judge_template: Annotated[str | None, opt(S, "judge_template")] = None,
    label_pattern: Annotated[str | None, opt(S, "label_pattern")] = None,
    labels: Annotated[str | None, opt(S, "labels")] = None,
    ignore_case: Annotated[bool | None, opt(S, "ignore_case")] = None,
    limit: Annotated[int | None, opt(S, "limit")] = None,
    seed: Annotated[int | None, opt(S, "seed")] = None,
    out: Annotated[Path | None, opt(S, "out")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    max_tokens: Annotated[int | None, opt(S, "max_tokens")] = None,
    temp: Annotated[float | None, opt(S, "temp")] = None,
    top_p: Annotated[float | None, opt(S, "top_p")] = None,
    top_k: Annotated[int | None, opt(S, "top_k")] = None,
    min_p: Annotated[float | None, opt(S, "min_p")] = None,
    repetition_penalty: Annotated[float | None, opt(S, "repetition_penalty")] = None,
    stop: Annotated[list[str] | None, opt(S, "stop")] = None,
    revision: Annotated[str | None, opt(S, "revision")] = None,
    trust_remote_code: Annotated[bool | None, opt(S, "trust_remote_code")] = None,
    quantize: Annotated[int | None, opt(S, "quantize")] = None,
    q_group_size: Annotated[int | None, opt(S, "q_group_size")] = None,
    dtype: Annotated[str | None, opt(S, "dtype")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Measure a model (and what an adapter changed) on a data split: loss, generations, judge verdicts."""
    run_command("eval", locals(), _render)


def _render(result: Any, settings: S) -> None:
    from lorakit.cli.reporting import out_console

    console = out_console()
    for name, metrics in result.results.items():
        console.print(f"{name}: " + "  ".join(f"{k}={v:.4g}" for k, v in _headline(metrics).items()))
    for key, value in result.change.items():
        console.print(f"change {key}: {value:+.4g}")
    console.print(f"wrote {result.out}/eval.json and {result.out}/predictions.jsonl")


def _headline(metrics: dict) -> dict[str, float]:
    """The few numbers worth a line on stdout (all of them are in eval.json)."""
    keys = {"loss": ("loss", "perplexity"), "generation": ("exact_match", "contains", "f1", "label_accuracy"),
            "judge": ("accuracy", "consistency", "agreement", "position_bias")}
    return {f"{section}.{k}" if section != "loss" else k: metrics[section][k]
            for section, names in keys.items() if metrics.get(section) for k in names
            if metrics[section].get(k) is not None}
