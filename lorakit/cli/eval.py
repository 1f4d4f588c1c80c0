"""`lorakit eval`: loss and perplexity on a split, generation metrics, and a pairwise-judge check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt
from lorakit.cli.common import run_command
from lorakit.settings import EvalSettings as S


def command(
    model: Annotated[Optional[str], opt(S, "model")] = None,
    data: Annotated[Optional[Path], opt(S, "data")] = None,
    split: Annotated[Optional[str], opt(S, "split")] = None,
    adapter_path: Annotated[Optional[Path], opt(S, "adapter_path")] = None,
    compare_base: Annotated[Optional[bool], opt(S, "compare_base")] = None,
    batch_size: Annotated[Optional[int], opt(S, "batch_size")] = None,
    max_seq_length: Annotated[Optional[int], opt(S, "max_seq_length")] = None,
    train_on: Annotated[Optional[str], opt(S, "train_on")] = None,
    generate: Annotated[Optional[bool], opt(S, "generate")] = None,
    judge: Annotated[Optional[bool], opt(S, "judge")] = None,
    judge_template: Annotated[Optional[str], opt(S, "judge_template")] = None,
    label_pattern: Annotated[Optional[str], opt(S, "label_pattern")] = None,
    labels: Annotated[Optional[str], opt(S, "labels")] = None,
    ignore_case: Annotated[Optional[bool], opt(S, "ignore_case")] = None,
    limit: Annotated[Optional[int], opt(S, "limit")] = None,
    seed: Annotated[Optional[int], opt(S, "seed")] = None,
    out: Annotated[Optional[Path], opt(S, "out")] = None,
    overwrite: Annotated[Optional[bool], opt(S, "overwrite")] = None,
    max_tokens: Annotated[Optional[int], opt(S, "max_tokens")] = None,
    temp: Annotated[Optional[float], opt(S, "temp")] = None,
    top_p: Annotated[Optional[float], opt(S, "top_p")] = None,
    top_k: Annotated[Optional[int], opt(S, "top_k")] = None,
    min_p: Annotated[Optional[float], opt(S, "min_p")] = None,
    repetition_penalty: Annotated[Optional[float], opt(S, "repetition_penalty")] = None,
    stop: Annotated[Optional[list[str]], opt(S, "stop")] = None,
    revision: Annotated[Optional[str], opt(S, "revision")] = None,
    trust_remote_code: Annotated[Optional[bool], opt(S, "trust_remote_code")] = None,
    quantize: Annotated[Optional[int], opt(S, "quantize")] = None,
    q_group_size: Annotated[Optional[int], opt(S, "q_group_size")] = None,
    dtype: Annotated[Optional[str], opt(S, "dtype")] = None,
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
