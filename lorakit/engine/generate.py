"""`lorakit generate`: answer prompts with a model (and adapter) through mlx-lm's generation and sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.engine.model.adapters import load_adapter
from lorakit.engine.model.generation import (
    Generation,
    Messages,
    base_model,
    build_prompt,
    check_messages,
    generate_batch,
    generate_one,
    make_sampling,
)
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import iter_jsonl, write_jsonl


@dataclass
class GenerateResult:
    model: str
    adapter: str | None
    text: str | None = None  # --prompt
    base_text: str | None = None  # --prompt --compare-base
    finish_reason: str | None = None
    results: list[dict] | None = None  # --input without --output: one row per line
    output: str | None = None  # --input --output FILE
    count: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0


@dataclass
class _Record:
    line: int
    prompt: str | Messages
    id: Any = None
    has_id: bool = False


def _read_input(path: Path) -> list[_Record]:
    if not path.is_file():
        raise UserError(f"--input {path}: file not found (expected JSONL with 'prompt' or 'messages' per line)")
    records = []
    for line, obj in iter_jsonl(path):
        has_prompt, has_messages = "prompt" in obj, "messages" in obj
        if has_prompt == has_messages:
            raise UserError(f"{path}:{line}: expected exactly one of 'prompt' (text) or 'messages' (a chat); "
                            f"got {'both' if has_prompt else 'neither'}")
        if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
            raise UserError(f"{path}:{line}: 'prompt' must be a non-empty string")
        try:
            prompt = obj["prompt"] if has_prompt else check_messages(obj["messages"])
        except UserError as e:
            raise UserError(f"{path}:{line}: {e}") from None
        records.append(_Record(line=line, prompt=prompt, id=obj.get("id"), has_id="id" in obj))
    if not records:
        raise UserError(f"--input {path}: no prompts in this file (one JSON object per line)")
    return records


def _check_settings(settings: Any) -> str | list[_Record]:
    """Every input problem found before the model is loaded. Returns the prompt text or the input records."""
    if (settings.prompt is None) == (settings.input is None):
        raise UserError("pass exactly one of --prompt TEXT, --prompt - (read stdin) or --input prompts.jsonl")
    if settings.compare_base and settings.adapter_path is None:
        raise UserError("--compare-base compares the adapter with its base: pass --adapter-path too")
    if settings.system is not None and not settings.chat_template:
        raise UserError("--system needs the chat template: drop --no-chat-template or --system")
    if settings.output is not None:
        if settings.input is None:
            raise UserError("--output is for --input results; a --prompt answer goes to stdout")
        if settings.output.exists() and not settings.overwrite:
            raise UserError(f"--output {settings.output}: file exists; pass --overwrite to replace it")
    if settings.input is not None:
        return _read_input(settings.input)
    if not settings.prompt.strip():
        raise UserError("--prompt: empty prompt")
    return settings.prompt


def run(settings: Any, reporter: Reporter, on_token: Callable[[str], None] | None = None) -> GenerateResult:
    """Answer --prompt (its text; the CLI reads stdin for '-') or every line of --input.

    `on_token` receives a single prompt's answer piece by piece as it is generated (the CLI streams it).
    """
    inputs = _check_settings(settings)
    loaded = load_model(settings, reporter)
    adapter_dir = load_adapter(loaded, settings.adapter_path, reporter) if settings.adapter_path else None
    use_template = settings.chat_template
    if use_template and not loaded.tokenizer.has_chat_template:
        reporter.warn(f"the tokenizer of {settings.model} has no chat template; using the prompt text as is")
        use_template = False
    result = GenerateResult(model=settings.model, adapter=str(adapter_dir) if adapter_dir else None)
    if isinstance(inputs, str):
        return _answer_prompt(settings, loaded, inputs, use_template, on_token, result)
    return _answer_input(settings, loaded, inputs, use_template, reporter, result)


def _answer_prompt(settings: Any, loaded: Any, prompt: str, use_template: bool,
                   on_token: Callable[[str], None] | None, result: GenerateResult) -> GenerateResult:
    tokens = build_prompt(loaded.tokenizer, prompt, settings.system, use_template)
    sampling = make_sampling(settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    limits = (settings.max_tokens, settings.stop, settings.seed)
    answer = generate_one(model, tokenizer, tokens, sampling, *limits, on_text=on_token)
    if settings.compare_base:
        with base_model(model):
            result.base_text = generate_one(model, tokenizer, tokens, sampling, *limits).text
    result.text, result.finish_reason, result.count = answer.text, answer.finish_reason, 1
    result.prompt_tokens, result.generation_tokens = answer.prompt_tokens, answer.generation_tokens
    result.prompt_tps, result.generation_tps = answer.prompt_tps, answer.generation_tps
    result.peak_memory = answer.peak_memory
    return result


def _answer_input(settings: Any, loaded: Any, records: list[_Record], use_template: bool, reporter: Reporter,
                  result: GenerateResult) -> GenerateResult:
    prompts = []
    for rec in records:
        try:
            prompts.append(build_prompt(loaded.tokenizer, rec.prompt, settings.system, use_template))
        except UserError as e:
            raise UserError(f"{settings.input}:{rec.line}: {e}") from None
    sampling = make_sampling(settings)
    reporter.start("generate", total=len(prompts) * (2 if settings.compare_base else 1))

    def batch() -> list[Generation]:
        return generate_batch(loaded.model, loaded.tokenizer, prompts, sampling, settings.max_tokens,
                              settings.stop, settings.seed, settings.batch_size,
                              on_result=lambda i: reporter.advance(1))

    answers = batch()
    base_answers: list[Generation | None] = [None] * len(answers)
    if settings.compare_base:
        with base_model(loaded.model):
            base_answers = batch()
    reporter.finish()

    rows = []
    for rec, answer, base in zip(records, answers, base_answers, strict=True):
        row = {"id": rec.id} if rec.has_id else {}
        row.update(text=answer.text, finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                   generation_tokens=answer.generation_tokens)
        if base is not None:
            row["base_text"] = base.text
        rows.append(row)
    if settings.output is not None:
        write_jsonl(settings.output, rows)
        reporter.log(f"wrote {len(rows)} results to {settings.output}")
        result.output = str(settings.output)
    else:
        result.results = rows
    result.count = len(rows)
    result.prompt_tokens = sum(a.prompt_tokens for a in answers)
    result.generation_tokens = sum(a.generation_tokens for a in answers)
    result.prompt_tps, result.generation_tps = answers[0].prompt_tps, answers[0].generation_tps
    result.peak_memory = max(a.peak_memory for a in answers)
    return result
