"""`lorakit eval`: what a model (and an adapter) does on a data split.

For each evaluated model ("base" and/or "adapter"):
  loss        token-weighted cross-entropy and perplexity over the split's loss-bearing tokens, with the
              same tokenisation and masks as training (lorakit.engine.data.tokenized / batching / losses)
  generation  (--generate) the prompt (everything before the last assistant turn; a prompt/completion
              record's prompt; a text record up to --prompt-delimiter) is completed and scored against the
              rest: exact match, contains, token F1, and labels (--label-pattern / --labels)
  preference  (a split of prompt/chosen/rejected pairs) how often the model prefers the chosen reply, and
              with --compare-base the adapter's DPO reward accuracy against the base
              (lorakit.engine.scoring.preference); `loss` is then the loss on the chosen replies
  judge       (--judge) every judge record asked as given and with answers A and B swapped: verdict
              accuracy, position consistency, agreement and A/B/tie bias (see lorakit.engine.scoring.metrics)

Prompts (for the loss as for generation, base and adapter alike) are rendered the way the adapter was trained
(its adapter_config.json records it): raw prompt + completion for an adapter trained on text or on completions
without a template, the same chat template otherwise; --chat-template / --no-chat-template / --template NAME
override it. Without an adapter (or with one that does not record it) the tokenizer's template is used when it
has one. 'text' records are always scored as they are. eval.json's `rendering` says what was used.

--compare-base loads the model once: the adapter is applied, and the base is evaluated with the LoRA layers
switched off (lorakit.engine.generate.base_model). Outputs go to --out: eval.json (the EvalResult) and
predictions.jsonl (one row per model and example).
"""

from __future__ import annotations

import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from lorakit.engine.data.batching import Batch, BatchPlan
from lorakit.engine.data.tokenized import (
    TOKENIZER_TEMPLATE,
    TokenizedExample,
    detect_format,
    load_split,
    split_path,
)
from lorakit.engine.data.verdicts import VERDICTS, swap_verdict
from lorakit.engine.model.adapters import (
    ADAPTER_FILE,
    load_adapter,
    read_adapter_config,
    resolve_adapter_dir,
    trained_rendering,
)
from lorakit.engine.model.generation import (
    Rendering,
    base_model,
    build_prompt,
    choose_rendering,
    fit_rendering,
    generate_batch,
    make_sampling,
)
from lorakit.engine.model.loading import LoadedModel, load_model
from lorakit.engine.model.losses import loss_head, token_losses
from lorakit.engine.reporter import Reporter
from lorakit.engine.scoring import metrics
from lorakit.engine.scoring.judge import JudgeItem, JudgePrompt, judge_item
from lorakit.engine.scoring.preference import preference_metrics
from lorakit.errors import UserError
from lorakit.io import (
    check_output_location,
    ensure_new_dir,
    iter_jsonl,
    output_lock,
    replace_dir,
    sha256_file,
    staging_dir,
    write_json,
    write_jsonl,
)
from lorakit.settings import EvalSettings, settings_dict


@dataclass
class EvalResult:
    split: str
    data: str
    out: str
    examples: int  # evaluated (after --limit)
    split_examples: int  # records in the split file
    model: dict[str, Any]
    adapter: dict[str, Any] | None
    results: dict[str, dict[str, Any]]  # "base" / "adapter" -> {"loss": ..., "generation": ..., "judge": ...}
    change: dict[str, float]  # adapter minus base, with --compare-base
    settings: dict[str, Any]
    rendering: dict[str, Any] = field(default_factory=dict)  # how prompts were rendered (Rendering.as_dict)
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Record:
    """One chosen example of the split: its line, the raw record, and what generation needs."""

    index: int  # position in the split file
    line: int
    raw: dict[str, Any]
    prompt: str | list[dict] | None = None  # --generate: text or chat before the last assistant turn
    reference: str | None = None
    reference_label: str | None = None
    judge: JudgeItem | None = None
    prompt_tokens: list[int] | None = None  # --generate: the prompt rendered (tokenize_prompts)
    judge_tokens: tuple[list[int], list[int]] | None = None  # --judge: asked as given and swapped


def choose(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the examples to evaluate: all, or `limit` of them drawn by `seed`, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def out_dir(settings: EvalSettings) -> Path:
    if settings.out is not None:
        return Path(settings.out)
    name = f"eval-{settings.split}"
    return Path(settings.adapter_path) / name if settings.adapter_path else Path(name)


def generation_parts(raw: dict, where: str, delimiter: str | None = None) -> tuple[str | list[dict], str]:
    """(prompt, reference) of a chat or prompt/completion record (the last assistant turn, or the completion,
    is the reference), of a preference pair (the chosen reply is the reference), or of a text record split after
    the last `delimiter` (--prompt-delimiter)."""
    if delimiter is not None:
        return _split_text(raw, where, delimiter)
    if "chosen" in raw and "rejected" in raw:  # a preference pair: its prompt; the chosen reply is the reference
        prompt, chosen = raw.get("prompt"), raw.get("chosen")
        if isinstance(chosen, list) and chosen and isinstance(chosen[-1], dict):
            chosen = chosen[-1].get("content")
        if not (isinstance(prompt, (str, list)) and prompt and isinstance(chosen, str)):
            raise UserError(f"{where}: --generate needs the pair's 'prompt' and its 'chosen' reply (the reference)")
        return prompt, chosen
    if isinstance(raw.get("messages"), list):
        messages = raw["messages"]
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not turns or turns[-1] == 0:
            raise UserError(f"{where}: --generate needs a chat with an assistant turn after some prompt")
        last = turns[-1]
        return messages[:last], str(messages[last].get("content", ""))
    if isinstance(raw.get("prompt"), str) and isinstance(raw.get("completion"), str):
        return raw["prompt"], raw["completion"]
    raise UserError(f"{where}: --generate needs chat ('messages') or 'prompt'/'completion' records to split into "
                    "prompt and reference; plain 'text' records have no reference answer unless "
                    "--prompt-delimiter STR splits them (e.g. --prompt-delimiter '\\nA:')")


def _split_text(raw: dict, where: str, delimiter: str) -> tuple[str, str]:
    """A text record as (prompt: up to and including the last `delimiter`, reference: the rest)."""
    text = raw.get("text")
    if "messages" in raw or "prompt" in raw or not isinstance(text, str):
        raise UserError(f"{where}: --prompt-delimiter splits 'text' records; this one has keys {sorted(raw)} "
                        "(chat and prompt/completion records are split already: drop --prompt-delimiter)")
    at = text.rfind(delimiter)
    if at < 0:
        raise UserError(f"{where}: no --prompt-delimiter {delimiter!r} in this text record, so it cannot be "
                        "split into prompt and reference")
    end = at + len(delimiter)
    if not text[end:].strip():
        raise UserError(f"{where}: nothing follows --prompt-delimiter {delimiter!r}: no reference to score")
    return text[:end], text[end:]


def _label_extractor(settings: EvalSettings) -> metrics.LabelExtractor | None:
    if settings.label_pattern is None and not settings.labels:
        return None
    try:
        return metrics.LabelExtractor(settings.label_pattern, settings.labels, settings.ignore_case)
    except re.error as e:
        raise UserError(f"--label-pattern {settings.label_pattern!r}: not a valid regular expression ({e})") from None


def read_records(settings: EvalSettings, path: Path, reporter: Reporter) -> tuple[list[Record], int]:
    """The chosen records with everything generation and judging need; every input problem is raised here,
    before a model is loaded."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise UserError(f"{path}: no records; the {settings.split} split must hold at least one example")
    records = [Record(index=i, line=rows[i][0], raw=rows[i][1])
               for i in choose(len(rows), settings.limit, settings.seed)]
    extractor = _label_extractor(settings)
    for rec in records:
        where = f"{path}:{rec.line}"
        if settings.generate:
            rec.prompt, rec.reference = generation_parts(rec.raw, where, settings.prompt_delimiter)
            if extractor is not None:
                rec.reference_label = extractor(rec.reference)
        if settings.judge:
            rec.judge = judge_item(rec.raw, rec.line, path)
    if extractor is not None:
        labelled = sum(r.reference_label is not None for r in records)
        how = (f"--label-pattern {settings.label_pattern!r}" if settings.label_pattern
               else f"--labels {','.join(settings.labels)}")
        if labelled == 0:
            sample = (records[0].reference or "")[:120]
            raise UserError(f"{how}: found no label in any reference of {path} (e.g. line {records[0].line}: "
                            f"{sample!r}); fix the pattern or labels")
        if labelled < len(records):
            reporter.warn(f"{how}: {len(records) - labelled} of {len(records)} references have no label; "
                          "they are left out of label accuracy")
    return records, len(rows)


def adapter_identity(settings: EvalSettings, directory: Path | None) -> dict[str, Any] | None:
    """Describe the adapter loaded from `directory` (load_adapter already checked that it fits the base)."""
    if directory is None:
        return None
    config = read_adapter_config(directory)
    return {
        "path": str(settings.adapter_path),
        "dir": str(directory),
        "trained_on": config.get("model"),
        "fine_tune_type": config.get("fine_tune_type", "lora"),
        "lora_parameters": {k: v for k, v in (config.get("lora_parameters") or {}).items() if k != "keys"},
        "sha256": sha256_file(directory / ADAPTER_FILE),
    }


def model_identity(settings: EvalSettings, loaded: LoadedModel) -> dict[str, Any]:
    return {"name": loaded.name, "path": str(loaded.path), "source": loaded.source, "dtype": settings.dtype,
            "quantization": loaded.config.get("quantization"), "signature": loaded.signature}


# ---- loss ---------------------------------------------------------------------------------------------------

def row_losses(model: nn.Module, batch: Batch, head: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss sums and loss-token counts of one batch (losses.token_losses, summed per row)."""
    data = batch.to_mx()
    ce, weights, positions = token_losses(model, data, head)
    owner = positions // data["inputs"].shape[1]
    rows = data["inputs"].shape[0]
    sums = mx.zeros((rows,), dtype=mx.float32).at[owner].add(ce)
    counts = mx.zeros((rows,), dtype=mx.float32).at[owner].add(weights)
    mx.eval(sums, counts)
    return np.array(sums), np.array(counts)


def example_losses(model: nn.Module, examples: list[TokenizedExample], settings: EvalSettings, reporter: Reporter,
                   label: str) -> tuple[np.ndarray, np.ndarray]:
    """Loss sum and loss-token count of every example, batched by length (the order of `examples` kept)."""
    plan = BatchPlan(examples, settings.batch_size, settings.max_seq_length, pack=False, shuffle=False)
    head = loss_head(model)
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    reporter.start(f"loss ({label})", total=len(examples))
    done_sum = done_tokens = 0.0
    for b in range(len(plan)):
        members = [row[0] for row in plan.batches[b]]
        row_sum, row_count = row_losses(model, plan.build(b), head)
        sums[members], counts[members] = row_sum, row_count
        done_sum, done_tokens = done_sum + row_sum.sum(), done_tokens + row_count.sum()
        reporter.advance(len(members), loss=done_sum / max(done_tokens, 1))
    reporter.finish()
    return sums, counts


def loss_metrics(sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    tokens = float(counts.sum())
    loss = float(sums.sum()) / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": int(tokens),
            "examples": len(counts)}


def loss_examples(settings: EvalSettings, loaded: LoadedModel, records: list[Record], n_rows: int,
                  reporter: Reporter, rendering: Rendering | None = None) -> list[TokenizedExample]:
    """The tokenised, masked examples of the chosen records (via data.load_split, as training reads them),
    rendered as `rendering` says (None: as training renders; 'text' records as they are)."""
    text = detect_format(records[0].raw, f"{settings.data}/{settings.split}.jsonl:{records[0].line}") == "text"
    template = TOKENIZER_TEMPLATE if text or rendering is None else rendering.split_template
    split = load_split(settings.data, settings.split, loaded.tokenizer, settings.train_on, settings.max_seq_length,
                       reporter, template=template)
    if split.dropped:
        raise UserError(f"{split.path}: {split.dropped} examples have no loss-bearing token within "
                        f"--max-seq-length {settings.max_seq_length} (--train-on {split.train_on}); raise "
                        "--max-seq-length so every example can be scored")
    if split.records != n_rows:
        raise UserError(f"{split.path}: read {n_rows} records but tokenised {split.records}; "
                        "is the file being rewritten?")
    if split.format == "preference":  # each record's chosen and rejected reply
        return [split.examples[2 * r.index + k] for r in records for k in (0, 1)]
    return [split.examples[r.index] for r in records]


# ---- generation and judging ---------------------------------------------------------------------------------

def _generate(loaded: LoadedModel, prompts: list[list[int]], settings: EvalSettings, reporter: Reporter,
              task: str) -> list[str]:
    reporter.start(task, total=len(prompts))
    answers = generate_batch(loaded.model, loaded.tokenizer, prompts, make_sampling(settings), settings.max_tokens,
                             settings.stop, settings.seed, settings.batch_size,
                             on_result=lambda i: reporter.advance(1))
    reporter.finish()
    return [a.text for a in answers]


def choose_prompt_rendering(settings: EvalSettings, path: Path, records: list[Record],
                            reporter: Reporter) -> Rendering:
    """How this run renders prompts, decided before the model loads (a wrong --adapter-path, a template that
    cannot load, or chat records that would be rendered as raw text fail here); fit_rendering completes it."""
    trained = None
    if settings.adapter_path is not None:
        trained = trained_rendering(read_adapter_config(resolve_adapter_dir(settings.adapter_path)))
    rendering = choose_rendering(settings.chat_template, settings.template, trained,
                                 adapter=settings.adapter_path is not None)
    fmt = detect_format(records[0].raw, f"{path}:{records[0].line}")
    if fmt == "text":
        if settings.chat_template or settings.template:
            reporter.warn(f"{path} holds 'text' records, which are scored as they are: "
                          f"{'--template' if settings.template else '--chat-template'} changes nothing")
        return Rendering(None, "text records are scored as they are", trained)
    if fmt == "chat" and not rendering.chat:
        raise UserError(f"{path}: chat records need a chat template, but prompts are rendered as raw text here "
                        f"({rendering.reason}); pass --chat-template or --template NAME to render them through "
                        "one, or give 'prompt'/'completion' records")
    return rendering


def _prompt_tokens(loaded: LoadedModel, prompt: str | list[dict], rendering: Rendering, where: str) -> list[int]:
    try:
        return build_prompt(loaded.tokenizer, prompt, chat_template=rendering.chat, template=rendering.jinja)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def tokenize_prompts(settings: EvalSettings, loaded: LoadedModel, records: list[Record], rendering: Rendering,
                     judge: JudgePrompt | None) -> None:
    """Every record's generation prompt (and judge prompts, as given and swapped) as token ids, rendered once
    for base and adapter alike."""
    for rec in records:
        where = f"{settings.data}/{settings.split}.jsonl:{rec.line}"
        if settings.generate:
            rec.prompt_tokens = _prompt_tokens(loaded, rec.prompt, rendering, where)
        if judge is not None and rec.judge is not None:
            rec.judge_tokens = (_prompt_tokens(loaded, judge.messages(rec.judge), rendering, where),
                                _prompt_tokens(loaded, judge.messages(rec.judge.swapped()), rendering, where))


def generation_metrics(records: list[Record], outputs: list[str], settings: EvalSettings,
                       extractor: metrics.LabelExtractor | None) -> tuple[dict, list[dict]]:
    scores, rows = [], []
    predicted = []
    for rec, output in zip(records, outputs):
        score = metrics.text_scores(output, rec.reference, settings.ignore_case)
        scores.append(score)
        row = {"output": output, **score}
        if extractor is not None:
            label = extractor(output)
            predicted.append(label)
            row.update(label=label, reference_label=rec.reference_label,
                       correct=None if rec.reference_label is None else label == rec.reference_label)
        else:
            row["correct"] = score["exact_match"]
        rows.append(row)
    result: dict[str, Any] = metrics.text_metrics(scores)
    if extractor is not None:
        labels = metrics.label_metrics([r.reference_label for r in records], predicted, settings.labels)
        result["label_accuracy"] = labels.pop("accuracy")
        result["labels"] = labels
    return result, rows


def judge_results(items: list[JudgeItem], original: list[str], swapped: list[str],
                  extractor: metrics.LabelExtractor) -> tuple[dict, list[dict]]:
    verdicts = [extractor(t) for t in original]
    verdicts_swapped = [extractor(t) for t in swapped]
    result = metrics.judge_metrics([it.verdict for it in items], verdicts, verdicts_swapped)
    rows = []
    for it, out, out_s, v, v_s in zip(items, original, swapped, verdicts, verdicts_swapped):
        rows.append({"judge_output": out, "judge_label": v, "judge_correct": v == it.verdict,
                     "judge_output_swapped": out_s, "judge_label_swapped": v_s,
                     "judge_correct_swapped": v_s == swap_verdict(it.verdict),
                     "judge_consistent": v is not None and v_s == swap_verdict(v)})
    return result, rows


# ---- one model ----------------------------------------------------------------------------------------------

def evaluate(name: str, loaded: LoadedModel, settings: EvalSettings, records: list[Record],
             examples: list[TokenizedExample], template: JudgePrompt | None, reporter: Reporter,
             timings: dict[str, float], reference: np.ndarray | None = None) -> tuple[dict, list[dict]]:
    """All requested metrics for the model as it stands now; returns (metrics, prediction rows). The prompts
    are the records' prompt_tokens / judge_tokens (tokenize_prompts). Preference pairs (two examples per
    record) get preference metrics, with DPO rewards against `reference` (the base's log-probs) if given."""
    rows: list[dict[str, Any]] = [{"model": name, "index": r.index, "line": r.line} for r in records]
    result: dict[str, Any] = {}

    t0 = time.perf_counter()
    sums, counts = example_losses(loaded.model, examples, settings, reporter, name)
    if len(examples) == 2 * len(records):
        result["preference"] = preference_metrics(-sums, counts, reference)
        for row, c_logp, r_logp in zip(rows, -sums[0::2], -sums[1::2]):
            row.update(chosen_logp=float(c_logp), rejected_logp=float(r_logp), correct=bool(c_logp > r_logp))
        sums, counts = sums[0::2], counts[0::2]
    result["loss"] = loss_metrics(sums, counts)
    for row, s, c in zip(rows, sums, counts):
        row.update(loss=float(s / c) if c else None, loss_tokens=int(c))
    timings[f"{name}.loss_s"] = time.perf_counter() - t0

    if settings.generate:
        t0 = time.perf_counter()
        prompts = [r.prompt_tokens for r in records]
        outputs = _generate(loaded, prompts, settings, reporter, f"generate ({name})")
        result["generation"], gen_rows = generation_metrics(records, outputs, settings, _label_extractor(settings))
        for row, rec, gen in zip(rows, records, gen_rows):
            row.update(input=rec.prompt, reference=rec.reference, **gen)
        timings[f"{name}.generate_s"] = time.perf_counter() - t0

    if template is not None:
        t0 = time.perf_counter()
        items = [r.judge for r in records]
        prompts = [*[r.judge_tokens[0] for r in records], *[r.judge_tokens[1] for r in records]]
        outputs = _generate(loaded, prompts, settings, reporter, f"judge ({name})")
        extractor = metrics.LabelExtractor(settings.label_pattern, list(VERDICTS), settings.ignore_case)
        result["judge"], judge_rows = judge_results(items, outputs[:len(items)], outputs[len(items):], extractor)
        result["judge"]["template"] = template.source
        for row, it, jr in zip(rows, items, judge_rows):
            row.setdefault("input", {"question": it.question, "answer_a": it.answer_a, "answer_b": it.answer_b})
            row.setdefault("reference", it.verdict)
            row.update(jr)
            row.setdefault("output", jr["judge_output"])
            row.setdefault("label", jr["judge_label"])
            row.setdefault("correct", jr["judge_correct"])
        timings[f"{name}.judge_s"] = time.perf_counter() - t0
    return result, rows


# ---- the command --------------------------------------------------------------------------------------------

HEADLINE = {
    "loss": ("loss", "perplexity"),
    "preference": ("accuracy", "mean_accuracy", "reward_accuracy", "margin"),
    "generation": ("exact_match", "contains", "f1", "label_accuracy"),
    "judge": ("accuracy", "swapped_accuracy", "consistency", "agreement", "position_bias"),
}


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The comparable numbers of one model's results, as 'section.metric' -> value: what `change` compares
    and what the CLI shows (all of them are in eval.json)."""
    return {f"{section}.{k}": result[section][k] for section, keys in HEADLINE.items() if section in result
            for k in keys if isinstance(result[section].get(k), (int, float))}


def run(settings: EvalSettings, reporter: Reporter) -> EvalResult:
    start = time.perf_counter()
    if settings.compare_base and settings.adapter_path is None:
        raise UserError("--compare-base compares an adapter with its base: pass --adapter-path too")
    if settings.prompt_delimiter is not None and not settings.generate:
        raise UserError("--prompt-delimiter splits text records into prompt and reference for --generate: "
                        "pass --generate too")
    path = split_path(settings.data, settings.split)
    out = out_dir(settings)
    check_output_location(out, "--out", [("--data", settings.data), ("--model", settings.model),
                                         ("--adapter-path", settings.adapter_path)], inside_ok={"--adapter-path"})
    with output_lock(out, "--out"):
        ensure_new_dir(out, settings.overwrite)
        return _evaluate_and_write(settings, path, out, start, reporter)


def _evaluate_and_write(settings: EvalSettings, path: Path, out: Path, start: float,
                        reporter: Reporter) -> EvalResult:
    template = JudgePrompt(settings.judge_template) if settings.judge else None
    records, n_rows = read_records(settings, path, reporter)
    rendering = choose_prompt_rendering(settings, path, records, reporter)

    loaded = load_model(settings, reporter)
    # load_adapter refuses (exit 2) an adapter of another base before anything is evaluated
    adapter_dir = load_adapter(loaded, settings.adapter_path, reporter) if settings.adapter_path else None
    adapter = adapter_identity(settings, adapter_dir)
    rendering = fit_rendering(rendering, loaded.tokenizer, settings.model, reporter)
    examples = loss_examples(settings, loaded, records, n_rows, reporter, rendering)
    tokenize_prompts(settings, loaded, records, rendering, template)
    loaded.model.eval()

    timings: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    predictions: list[dict[str, Any]] = []
    reference = None
    if settings.adapter_path is None or settings.compare_base:
        with base_model(loaded.model):
            results["base"], rows = evaluate("base", loaded, settings, records, examples, template, reporter,
                                              timings)
        predictions += rows
        if "preference" in results["base"]:
            reference = np.array([[r["chosen_logp"], r["rejected_logp"]] for r in rows]).reshape(-1)
    if settings.adapter_path is not None:
        results["adapter"], rows = evaluate("adapter", loaded, settings, records, examples, template,
                                                 reporter, timings, reference)
        predictions += rows

    change = {}
    if len(results) == 2:
        base, tuned = headline(results["base"]), headline(results["adapter"])
        change = {k: tuned[k] - base[k] for k in tuned if k in base}
    result = EvalResult(split=settings.split, data=str(settings.data), out=str(out), examples=len(records),
                        split_examples=n_rows, model=model_identity(settings, loaded), adapter=adapter,
                        results=results, change=change, settings=settings_dict(settings),
                        rendering=rendering.as_dict(), timings=timings)
    result.elapsed_s = time.perf_counter() - start

    staging = staging_dir(out)
    try:
        write_jsonl(staging / "predictions.jsonl", predictions)
        write_json(staging / "eval.json", asdict(result))
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    reporter.log(f"wrote {out}/eval.json and {out}/predictions.jsonl")
    return result
