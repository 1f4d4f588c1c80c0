"""Generation building blocks shared by `generate` and `eval`: mlx-lm's sampling, how prompts are rendered
(`Rendering`: as the adapter was trained unless a flag says otherwise), prompts through a chat template or as
raw text, one streamed answer or a batch, and `base_model` (LoRA switched off without reloading the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.generate import BatchGenerator, TextStateMachine, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from lorakit.engine.data.tokenized import TOKENIZER_TEMPLATE, render_chat
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError

Messages = list[dict[str, str]]
_ADAPTED = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)


@dataclass
class Sampling:
    sampler: Callable[[mx.array], mx.array]
    logits_processors: list[Callable[[mx.array, mx.array], mx.array]]


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB, as mlx-lm reports it
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max tokens)


def make_sampling(opts: Any) -> Sampling:
    """mlx-lm's sampler and logits processors for the SamplingOptions fields of `opts` (greedy at temp 0)."""
    sampler = make_sampler(opts.temp, opts.top_p, opts.min_p, top_k=opts.top_k)
    processors = make_logits_processors(repetition_penalty=opts.repetition_penalty)
    return Sampling(sampler, processors)


@dataclass(frozen=True)
class Rendering:
    """How prompts become text: through a chat template or as raw text, and why."""

    template: str | None  # TOKENIZER_TEMPLATE, a built-in template name or Jinja file, or None: raw text
    reason: str  # why, in words: "as the adapter was trained (text records)", "--no-chat-template", ...
    trained: dict | None = None  # the adapter's record of how its training data was rendered
    jinja: str | None = None  # the source of a named template

    @property
    def chat(self) -> bool:
        return self.template is not None

    @property
    def split_template(self) -> str | None:
        """The `template` argument of data.tokenized.load_split that renders records the same way."""
        return self.jinja if self.jinja is not None else self.template

    def describe(self) -> str:
        how = {None: "raw text", TOKENIZER_TEMPLATE: "the tokenizer's chat template"}.get(
            self.template, f"chat template {self.template}")
        return f"{how} ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return {"template": self.template, "reason": self.reason, "trained": self.trained,
                "description": self.describe()}


def _trained_words(trained: dict) -> str:
    if trained["format"] == "text":
        return "text" + (f" rendered with {trained['template']}" if trained["template"] else "")
    if trained["format"] == "completions":
        return "completions" + ("" if trained["template"] else " without a template")
    return "chats"


def _named(name: str, reason: str, trained: dict | None, from_adapter: bool) -> Rendering:
    from lorakit.engine.data.templates import get_template

    try:
        return Rendering(name, reason, trained, get_template(name))
    except UserError as e:
        if not from_adapter:
            raise
        raise UserError(f"the adapter was trained on text rendered with template {name!r}, which cannot be "
                        f"loaded here ({e}); pass --template NAME, or --no-chat-template") from None


def choose_rendering(chat_template: bool | None, template: str | None, trained: dict | None,
                     adapter: bool) -> Rendering:
    """How to render prompts, before the model is loaded: --template NAME, --chat-template (the adapter's
    named template if it was trained with one, else the tokenizer's), --no-chat-template, or by default the
    way the adapter was trained (`trained`, adapters.trained_rendering); an adapter that does not say and no
    adapter at all keep the tokenizer's template (fit_rendering falls back to raw text without one)."""
    if template is not None:
        if chat_template is False:
            raise UserError("--template renders prompts through a chat template and --no-chat-template as raw "
                            "text: pass one of them")
        return _named(template, f"--template {template}", trained, from_adapter=False)
    if chat_template is False:
        return Rendering(None, "--no-chat-template", trained)
    trained_named = trained is not None and trained["template"] not in (None, TOKENIZER_TEMPLATE)
    if chat_template is True:
        if trained_named:
            return _named(trained["template"], "--chat-template", trained, from_adapter=True)
        return Rendering(TOKENIZER_TEMPLATE, "--chat-template", trained)
    if trained is not None:
        reason = f"as the adapter was trained: {_trained_words(trained)}"
        if trained_named:
            return _named(trained["template"], reason, trained, from_adapter=True)
        return Rendering(trained["template"], reason, trained)
    if adapter:
        return Rendering(TOKENIZER_TEMPLATE, "the default: the adapter does not say how it was trained")
    return Rendering(TOKENIZER_TEMPLATE, "the default without an adapter")


def fit_rendering(rendering: Rendering, tokenizer: Any, model: str, reporter: Reporter) -> Rendering:
    """The rendering for the loaded tokenizer: its own template stands for raw text when it has none."""
    if rendering.template != TOKENIZER_TEMPLATE or tokenizer.has_chat_template:
        return rendering
    if rendering.reason == "--chat-template":
        reporter.warn(f"the tokenizer of {model} has no chat template; using the prompt text as is")
    return replace(rendering, template=None, reason=f"{rendering.reason}; the tokenizer has none")


def check_messages(messages: Any) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return messages


def build_prompt(tokenizer: Any, prompt: str | Messages, system: str | None = None,
                 chat_template: bool = True, template: str | None = None) -> list[int]:
    """Token ids for a prompt text or a chat, through a chat template unless told otherwise: `template` (a
    Jinja source, rendered as `lorakit prepare` renders) or else the tokenizer's.

    `system` is put first unless the chat has its own system message. A chat ending with an assistant
    message is continued: its text is the start of the answer. Without a template (chat_template False,
    or a tokenizer that has none) a text prompt is encoded as is and a chat is refused.
    """
    if chat_template and (template is not None or tokenizer.has_chat_template):
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = check_messages(prompt)
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        text = _chat_text(tokenizer, messages, template)
        tokens = tokenizer.encode(text, add_special_tokens=False)
    elif isinstance(prompt, str):
        bos = tokenizer.bos_token
        tokens = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    else:
        raise UserError("'messages' needs a chat template, and prompts are rendered as raw text here; give a "
                        "'prompt' text instead, or render through a template (--chat-template, --template NAME)")
    if not tokens:
        raise UserError("the prompt is empty")
    return tokens


def _chat_text(tokenizer: Any, messages: Messages, template: str | None) -> str:
    """The chat through the template, ready for the answer: with the generation prompt, or (a chat ending
    with an assistant message) cut right after that message's text, which the answer continues."""
    prefill = messages[-1]["role"] == "assistant"
    try:
        if template is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not prefill,
                                                 continue_final_message=prefill)
        text = render_chat(tokenizer, messages, template, generation_prompt=not prefill)
    except Exception as e:  # noqa: BLE001  (jinja raises anything: SecurityError, TypeError, ...)
        which = "the tokenizer's chat template" if template is None else "the chat template"
        raise UserError(f"{which} cannot render this prompt ({type(e).__name__}: {e}); fix the template or "
                        "pass --no-chat-template") from None
    if prefill:
        content = messages[-1]["content"]
        end = text.rfind(content)
        text = text[:end + len(content)] if content and end >= 0 else text
    return text


def check_prompt_length(tokens: list[int], context_length: int | None, where: str) -> None:
    """Refuse a prompt longer than the model's context before spending minutes on its prefill."""
    if context_length is not None and len(tokens) >= context_length:
        raise UserError(f"{where}: the prompt is {len(tokens):,} tokens, the model's context is "
                        f"{context_length:,}; shorten it")


class _StopText:
    """Cuts generated text at the first stop string, holding back text that may be the start of one.

    mlx-lm's TextStateMachine matches on decoded text (robust to how the stop string is tokenized);
    a transition to the state None means stop.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.state = TextStateMachine({"normal": [(s, None) for s in stop]}).make_state()
        self.stopped = False

    def feed(self, text: str) -> str:
        self.state, segments = TextStateMachine.split(self.state, text)
        self.stopped = self.state[0] is None
        return "".join(t for _, t in segments)

    def flush(self) -> str:
        """The held-back text, once generation ended without completing a stop string."""
        if self.stopped:
            return ""
        self.state, rest, _ = TextStateMachine.flush(self.state)
        return rest


def generate_one(model: nn.Module, tokenizer: Any, prompt_tokens: list[int], sampling: Sampling,
                 max_tokens: int, stop: Sequence[str] = (), seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate one answer with mlx-lm's stream_generate; `on_text` gets each piece of text as it comes.

    The text ends before the first stop string; the end-of-sequence token is not part of it.
    """
    if seed is not None:
        mx.random.seed(seed)
    cut = _StopText(stop)
    pieces: list[str] = []
    finish_reason = "length"
    response = None
    for response in stream_generate(model, tokenizer, prompt_tokens, max_tokens=max_tokens,
                                     sampler=sampling.sampler, logits_processors=sampling.logits_processors):
        piece = cut.feed(response.text)
        if cut.stopped:
            finish_reason = "stop"
        elif response.finish_reason is not None:
            finish_reason = response.finish_reason
            piece += cut.flush()
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        if cut.stopped:
            break
    assert response is not None  # stream_generate always yields a final response
    return Generation(text="".join(pieces), prompt_tokens=response.prompt_tokens,
                      generation_tokens=response.generation_tokens, prompt_tps=response.prompt_tps,
                      generation_tps=response.generation_tps, peak_memory=response.peak_memory,
                      finish_reason=finish_reason)


def can_batch(model: nn.Module) -> bool:
    """Whether this model's KV caches can be merged into a batch (mlx-lm's BatchGenerator needs that)."""
    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def generate_batch(model: nn.Module, tokenizer: Any, prompts: list[list[int]], sampling: Sampling,
                   max_tokens: int, stop: Sequence[str] = (), seed: int | None = None, batch_size: int = 8,
                   on_result: Callable[[int], None] | None = None) -> list[Generation]:
    """Answer many prompts with mlx-lm's BatchGenerator (continuous batching); results in input order.

    With greedy sampling each answer equals generate_one's. Token counts are per prompt; tokens/s are
    the whole batch's. `on_result(index)` is called as each answer finishes. Models whose
    caches cannot be batched are answered one by one.
    """
    if seed is not None:
        mx.random.seed(seed)
    if batch_size == 1 or not can_batch(model):
        results = []
        for i, tokens in enumerate(prompts):
            results.append(generate_one(model, tokenizer, tokens, sampling, max_tokens, stop))
            if on_result is not None:
                on_result(i)
        return results

    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], sampler=sampling.sampler,
                         logits_processors=sampling.logits_processors, completion_batch_size=batch_size,
                         prefill_batch_size=batch_size)
    try:
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        index = {uid: i for i, uid in enumerate(uids)}
        detokenizers = {uid: tokenizer.detokenizer for uid in uids}
        cuts = {uid: _StopText(stop) for uid in uids}
        texts: dict[int, list[str]] = {uid: [] for uid in uids}
        counts = dict.fromkeys(uids, 0)
        finished: dict[int, str] = {}
        with gen.stats() as stats:
            while responses := gen.next_generated():
                for r in responses:
                    counts[r.uid] += 1
                    detokenizer, cut = detokenizers[r.uid], cuts[r.uid]
                    if r.finish_reason != "stop":  # "stop" here means end-of-sequence: not text
                        detokenizer.add_token(r.token)
                    if r.finish_reason is not None:
                        detokenizer.finalize()
                    texts[r.uid].append(cut.feed(detokenizer.last_segment))
                    if cut.stopped:
                        gen.remove([r.uid])
                        finished[r.uid] = "stop"
                    elif r.finish_reason is not None:
                        texts[r.uid].append(cut.flush())
                        finished[r.uid] = r.finish_reason
                    else:
                        continue
                    if on_result is not None:
                        on_result(index[r.uid])
    finally:
        gen.close()
    peak = mx.get_peak_memory() / 1e9
    return [
        Generation(text="".join(texts[uid]), prompt_tokens=len(prompts[index[uid]]),
                   generation_tokens=counts[uid], prompt_tps=stats.prompt_tps,
                   generation_tps=stats.generation_tps, peak_memory=peak, finish_reason=finished[uid])
        for uid in uids
    ]


@contextlib.contextmanager
def base_model(model: nn.Module) -> Iterator[int]:
    """Within the block, every LoRA/DoRA layer is swapped for the base layer it wraps; restored on exit.

    Yields the number of adapted layers switched off. Nothing is copied or reloaded.
    """
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, _ADAPTED)]
    bare = [(name, m.embedding if isinstance(m, (LoRAEmbedding, DoRAEmbedding)) else m.linear)
            for name, m in adapted]
    if bare:
        model.update_modules(tree_unflatten(bare))
    try:
        yield len(adapted)
    finally:
        if adapted:
            model.update_modules(tree_unflatten(adapted))
