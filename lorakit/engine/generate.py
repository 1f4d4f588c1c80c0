"""`lorakit generate`: answer prompts with a model (and adapter) through mlx-lm's generation and sampling.

Prompts are rendered the way the adapter was trained (raw text for an adapter trained on text or on completions
without a template, its chat template otherwise; model.generation.choose_rendering) unless --chat-template,
--no-chat-template or --template NAME says otherwise; without an adapter through the tokenizer's chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.engine.model.adapters import (
    load_adapter,
    read_adapter_config,
    resolve_adapter_dir,
    trained_rendering,
)
from lorakit.engine.model.generation import (
    Generation,
    Messages,
    Rendering,
    base_model,
    build_prompt,
    check_messages,
    check_prompt_length,
    choose_rendering,
    fit_rendering,
    generate_batch,
    generate_one,
    make_sampling,
)
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import check_output_location, iter_jsonl, output_lock, write_jsonl


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
    rendering: dict[str, Any] | None = None  # how prompts were rendered (Rendering.as_dict)


@dataclass
class _Record:
    line: int
    prompt: str | Messages
    id: Any = None
    has_id: bool = False


def _read_input(path: Path) -> list[_Record]:
    if path.is_dir():
        raise UserError(f"--input {path}: is a directory; give the JSONL file of prompts ('prompt' or "
                        "'messages' per line)")
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
    if settings.system is not None and settings.chat_template is False:
        raise UserError("--system needs the chat template: drop --no-chat-template or --system")
    if settings.output is not None:
        if settings.input is None:
            raise UserError("--output is for --input results; a --prompt answer goes to stdout")
        if settings.output.is_dir():
            raise UserError(f"--output {settings.output}: is a directory; give a file name such as "
                            f"{settings.output / 'answers.jsonl'}")
        check_output_location(settings.output, "--output", [("--input", settings.input), ("--model", settings.model),
                                                          ("--adapter-path", settings.adapter_path)])
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
    with output_lock(settings.output, "--output") if settings.output else contextlib.nullcontext():
        return _generate(settings, inputs, reporter, on_token)


def _generate(settings: Any, inputs: str | list[_Record], reporter: Reporter,
              on_token: Callable[[str], None] | None) -> GenerateResult:
    rendering = _choose_rendering(settings)
    loaded = load_model(settings, reporter)
    adapter_dir = load_adapter(loaded, settings.adapter_path, reporter) if settings.adapter_path else None
    rendering = fit_rendering(rendering, loaded.tokenizer, settings.model, reporter)
    reporter.log(f"prompts: {rendering.describe()}")  # before a streamed answer, not after it
    result = GenerateResult(model=settings.model, adapter=str(adapter_dir) if adapter_dir else None,
                            rendering=rendering.as_dict())
    if isinstance(inputs, str):
        return _answer_prompt(settings, loaded, inputs, rendering, on_token, result)
    return _answer_input(settings, loaded, inputs, rendering, reporter, result)


def _choose_rendering(settings: Any) -> Rendering:
    """How prompts are rendered (see the module docstring), decided before the model loads."""
    trained = None
    if settings.adapter_path is not None:
        trained = trained_rendering(read_adapter_config(resolve_adapter_dir(settings.adapter_path)))
    rendering = choose_rendering(settings.chat_template, settings.template, trained,
                                 adapter=settings.adapter_path is not None)
    if settings.system is not None and not rendering.chat:
        raise UserError(f"--system needs a chat template, but prompts are rendered as raw text here "
                        f"({rendering.reason}): pass --chat-template, or drop --system")
    return rendering


def _tokens(settings: Any, loaded: Any, prompt: str | Messages, rendering: Rendering, where: str) -> list[int]:
    tokens = build_prompt(loaded.tokenizer, prompt, settings.system, rendering.chat, rendering.jinja)
    check_prompt_length(tokens, loaded.context_length, where)
    return tokens


def _answer_prompt(settings: Any, loaded: Any, prompt: str, rendering: Rendering,
                   on_token: Callable[[str], None] | None, result: GenerateResult) -> GenerateResult:
    tokens = _tokens(settings, loaded, prompt, rendering, "--prompt")
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


def _answer_input(settings: Any, loaded: Any, records: list[_Record], rendering: Rendering, reporter: Reporter,
                  result: GenerateResult) -> GenerateResult:
    prompts = []
    for rec in records:
        try:
            prompts.append(_tokens(settings, loaded, rec.prompt, rendering, f"{settings.input}:{rec.line}"))
        except UserError as e:
            where = f"{settings.input}:{rec.line}"
            raise UserError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
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
