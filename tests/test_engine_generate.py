"""lorakit.engine.generate on tiny random models (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.tuner.lora import LoRALinear

from lorakit.engine import generate as g
from lorakit.engine.model import generation as gen
from lorakit.engine.model.adapters import adapter_config, apply_adapters, save_adapter
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import UserError
from lorakit.settings import GenerateSettings, TrainSettings
from lorakit.testing import tiny_model_dir

PROMPTS = ["What is the capital of France?", "hi", "def add(a, b):",
           "Thank you for contacting support. Your order ships in 3-5 business days.", "Numbers: 0 1 2"]


def make_adapter(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter on `model_dir` whose lora_b is random, so it changes the model's answers."""
    settings = TrainSettings(model=str(model_dir), data=Path("unused"), lora_rank=4)
    loaded = load_model(settings)
    params = apply_adapters(loaded.model, settings)
    mx.random.seed(seed)
    for _, layer in loaded.model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = 0.5 * mx.random.normal(layer.lora_b.shape)
    save_adapter(loaded.model, out, adapter_config(settings, loaded, params))
    return out


@pytest.fixture(scope="session")
def untied_model(tmp_path_factory):
    """A tiny llama with an untied head: its greedy answers vary with the prompt (the tied one repeats)."""
    return tiny_model_dir(tmp_path_factory.mktemp("untied") / "model", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def loaded(untied_model):
    return load_model(GenerateSettings(model=str(untied_model)))


def settings(model: Path, **kw) -> GenerateSettings:
    return GenerateSettings(model=str(model), **kw)


def greedy(**kw) -> gen.Sampling:
    return gen.make_sampling(GenerateSettings(model="m", **kw))


def test_build_prompt_applies_chat_template_and_system(loaded):
    tok = loaded.tokenizer
    chat = tok.decode(gen.build_prompt(tok, "hi", system="Be brief."))
    assert chat == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.decode(gen.build_prompt(tok, "hi", chat_template=False)) == "hi"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert tok.decode(gen.build_prompt(tok, messages)).endswith("<|im_start|>assistant\nHel")  # continued
    with pytest.raises(UserError, match="needs a chat template"):
        gen.build_prompt(tok, messages, chat_template=False)
    with pytest.raises(UserError, match=r"messages\[0\]"):
        gen.build_prompt(tok, [{"role": "user"}])


def test_greedy_is_deterministic_and_prompt_dependent(loaded):
    tokens = [gen.build_prompt(loaded.tokenizer, p) for p in PROMPTS[:2]]
    a, b = (gen.generate_one(loaded.model, loaded.tokenizer, tokens[0], greedy(), 16) for _ in range(2))
    assert a.text == b.text and a.finish_reason == "length" and a.generation_tokens == 16
    assert a.prompt_tokens == len(tokens[0]) and a.generation_tps > 0 and a.peak_memory > 0
    assert gen.generate_one(loaded.model, loaded.tokenizer, tokens[1], greedy(), 16).text != a.text


def test_sampling_is_deterministic_for_a_seed(loaded):
    tokens = gen.build_prompt(loaded.tokenizer, PROMPTS[0])
    sampling = greedy(temp=1.0, top_p=0.95, top_k=100, min_p=0.01, repetition_penalty=1.1)
    texts = [gen.generate_one(loaded.model, loaded.tokenizer, tokens, sampling, 24, seed=s).text
             for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2] or texts[0] != texts[3]


def test_streamed_pieces_make_the_text(loaded):
    pieces: list[str] = []
    tokens = gen.build_prompt(loaded.tokenizer, PROMPTS[0])
    out = gen.generate_one(loaded.model, loaded.tokenizer, tokens, greedy(), 20, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == out.text


def test_stop_strings_cut_the_text(loaded):
    tokens = gen.build_prompt(loaded.tokenizer, PROMPTS[2])
    full = gen.generate_one(loaded.model, loaded.tokenizer, tokens, greedy(), 40).text
    stop = full[6:9]
    assert stop and stop in full
    pieces: list[str] = []
    cut = gen.generate_one(loaded.model, loaded.tokenizer, tokens, greedy(), 40, stop=[stop, "never-said"],
                         on_text=pieces.append)
    assert cut.text == full[:full.index(stop)]
    assert "".join(pieces) == cut.text  # nothing of the stop string was streamed
    assert cut.finish_reason == "stop" and cut.generation_tokens < 40


def _force_eos_after(n_prompt: int, n: int, eos: int):
    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size >= n_prompt + n:
            return mx.where(mx.arange(logits.shape[-1]) == eos, 1e9, logits)
        return logits
    return processor


def test_end_of_sequence_ends_the_answer_and_is_not_text(loaded):
    tok = loaded.tokenizer
    eos = next(iter(tok.eos_token_ids))
    tokens = gen.build_prompt(tok, PROMPTS[0])
    sampling = gen.Sampling(greedy().sampler, [_force_eos_after(len(tokens), 3, eos)])
    one = gen.generate_one(loaded.model, tok, tokens, sampling, 40)
    assert one.finish_reason == "stop" and "<|im_end|>" not in one.text
    assert one.text == gen.generate_one(loaded.model, tok, tokens, greedy(), 3).text
    batch = gen.generate_batch(loaded.model, tok, [tokens, tokens], sampling, 40)
    assert [b.text for b in batch] == [one.text] * 2 and batch[0].finish_reason == "stop"


@pytest.mark.parametrize("batch_size", [1, 2, 8])  # 1: the one-by-one path
def test_batched_equals_one_by_one_for_greedy(loaded, batch_size):
    tokens = [gen.build_prompt(loaded.tokenizer, p) for p in PROMPTS]
    stop = ["capital", "Ver"]
    one = [gen.generate_one(loaded.model, loaded.tokenizer, t, greedy(), 30, stop=stop) for t in tokens]
    done: list[int] = []
    batch = gen.generate_batch(loaded.model, loaded.tokenizer, tokens, greedy(), 30, stop=stop,
                             batch_size=batch_size, on_result=done.append)
    assert [b.text for b in batch] == [o.text for o in one]
    assert [b.finish_reason for b in batch] == [o.finish_reason for o in one]
    assert [b.generation_tokens for b in batch] == [o.generation_tokens for o in one]
    assert sorted(done) == list(range(len(PROMPTS)))
    assert {o.finish_reason for o in one} == {"stop", "length"}  # both endings were exercised


def test_run_single_prompt_streams_and_reports_stats(untied_model):
    reporter = RecordingReporter()
    result = g.run(settings(untied_model, prompt=PROMPTS[0], max_tokens=12), reporter, on_token=reporter.on_token)
    streamed = "".join(text for kind, text in reporter.events if kind == "token")
    assert streamed == result.text and result.generation_tokens == 12 and result.finish_reason == "length"
    quiet = RecordingReporter()  # without on_token nothing is streamed (the CLI's choice with --json)
    again = g.run(settings(untied_model, prompt=PROMPTS[0], max_tokens=12, json_output=True), quiet)
    assert again.text == result.text and not [e for e in quiet.events if e[0] == "token"]


def test_run_takes_the_prompt_text_as_given(untied_model, monkeypatch):
    """Reading stdin for `--prompt -` is the CLI's job (test_cli_generate): the engine never reads it."""
    import io

    stdin = io.StringIO(PROMPTS[1])
    monkeypatch.setattr("sys.stdin", stdin)
    assert g.run(settings(untied_model, prompt="-", max_tokens=8), RecordingReporter()).text is not None
    assert stdin.read() == PROMPTS[1]  # untouched


def test_run_jsonl_input_keeps_order_and_ids(untied_model, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "prompt": PROMPTS[0]}),
        json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]}]}),
        "",
        json.dumps({"id": 3, "prompt": PROMPTS[2], "extra": "ignored"}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    result = g.run(settings(untied_model, input=path, output=out, max_tokens=10, batch_size=2),
                   RecordingReporter())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.count == 3 and result.output == str(out) and result.results is None
    assert [r.get("id") for r in rows] == ["a", None, 3] and "id" not in rows[1]
    single = g.run(settings(untied_model, prompt=PROMPTS[2], max_tokens=10), RecordingReporter())
    assert rows[2]["text"] == single.text
    with pytest.raises(UserError, match="--overwrite"):
        g.run(settings(untied_model, input=path, output=out), RecordingReporter())


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "messages": []}', "both"),
    ('{"id": 1}', "neither"),
    ('{"prompt": 5}', "non-empty string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\]"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "invalid JSON"),
])
def test_bad_input_lines_name_file_and_line(untied_model, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{message}"):
        g.run(settings(untied_model, input=path), RecordingReporter())


@pytest.mark.parametrize("kw, message", [
    ({}, "exactly one of --prompt"),
    ({"prompt": "x", "input": Path("p.jsonl")}, "exactly one of --prompt"),
    ({"prompt": "x", "compare_base": True}, "--adapter-path"),
    ({"prompt": "x", "system": "s", "chat_template": False}, "--system"),
    ({"prompt": "x", "output": Path("o.jsonl")}, "--output is for --input"),
    ({"prompt": "   "}, "empty prompt"),
])
def test_settings_problems_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        g.run(settings(Path("not-loaded"), **kw), RecordingReporter())


def test_adapter_changes_answers_and_compare_base_shows_both(untied_model, tmp_path):
    adapter = make_adapter(untied_model, tmp_path / "adapter")
    base = g.run(settings(untied_model, prompt=PROMPTS[0], max_tokens=16), RecordingReporter())
    tuned = g.run(settings(untied_model, prompt=PROMPTS[0], max_tokens=16, adapter_path=adapter),
                  RecordingReporter())
    assert tuned.text != base.text and tuned.adapter == str(adapter)
    both = g.run(settings(untied_model, prompt=PROMPTS[0], max_tokens=16, adapter_path=adapter,
                          compare_base=True), RecordingReporter())
    assert (both.text, both.base_text) == (tuned.text, base.text)


def test_base_model_switches_lora_off_and_back(untied_model, tmp_path):
    adapter = make_adapter(untied_model, tmp_path / "adapter")
    plain = load_model(GenerateSettings(model=str(untied_model)))
    tokens = gen.build_prompt(plain.tokenizer, PROMPTS[3])
    base_text = gen.generate_one(plain.model, plain.tokenizer, tokens, greedy(), 16).text
    from lorakit.engine.model.adapters import load_adapter

    load_adapter(plain, adapter)
    tuned_text = gen.generate_one(plain.model, plain.tokenizer, tokens, greedy(), 16).text
    with gen.base_model(plain.model) as switched:
        assert switched == 14  # 7 linear layers x 2 blocks
        assert gen.generate_one(plain.model, plain.tokenizer, tokens, greedy(), 16).text == base_text
    assert gen.generate_one(plain.model, plain.tokenizer, tokens, greedy(), 16).text == tuned_text != base_text


def test_adapter_best_dir_is_used_and_other_base_refused(untied_model, tmp_path):
    adapter = make_adapter(untied_model, tmp_path / "run" / "best")
    result = g.run(settings(untied_model, prompt="hi", max_tokens=4, adapter_path=tmp_path / "run"),
                   RecordingReporter())
    assert result.adapter == str(adapter)
    other = tiny_model_dir(tmp_path / "other", hidden_size=32, tie_word_embeddings=False)
    foreign = make_adapter(other, tmp_path / "foreign")
    with pytest.raises(UserError, match="hidden_size: adapter 32 vs model 64"):
        g.run(settings(untied_model, prompt="hi", adapter_path=foreign), RecordingReporter())


def test_jsonl_compare_base_adds_base_text(untied_model, tmp_path):
    adapter = make_adapter(untied_model, tmp_path / "adapter")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    result = g.run(settings(untied_model, input=path, adapter_path=adapter, compare_base=True, max_tokens=8),
                   RecordingReporter())
    plain = g.run(settings(untied_model, input=path, max_tokens=8), RecordingReporter())
    assert [r["base_text"] for r in result.results] == [r["text"] for r in plain.results]
    assert [r["text"] for r in result.results] != [r["text"] for r in plain.results]
