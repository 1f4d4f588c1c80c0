"""Issue 23: eval and generate render prompts the way the adapter was trained (its adapter_config.json records
it), --chat-template / --no-chat-template / --template override that, and --prompt-delimiter splits text records.

On the tiny in-process model (chatml template): the exact token ids handed to generation and to the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lorakit.builtin_templates import BUILTIN_TEMPLATES
from lorakit.cli.app import app
from lorakit.engine import eval as ev
from lorakit.engine import generate as g
from lorakit.engine.data.templates import render
from lorakit.engine.data.tokenized import load_split, rendering_of
from lorakit.engine.model import generation as gen
from lorakit.engine.model.adapters import adapter_config, trained_rendering
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter, Reporter
from lorakit.errors import UserError
from lorakit.settings import EvalSettings, GenerateSettings, TrainSettings
from lorakit.testing import random_adapter_dir

QA = [("table: t1\ncolumns: Name, Capital\nQ: capital of France?\nA:", " SELECT Capital FROM t1 WHERE Name = 'France'"),
      ("table: t2\ncolumns: Name, Sum\nQ: what is 2 + 2?\nA:", " SELECT Sum FROM t2 WHERE Name = '2 + 2'"),
      ("table: t3\ncolumns: Name, Reply\nQ: greet me\nA:", " SELECT Reply FROM t3 WHERE Name = 'greeting'")]
TEXT = {"format": "text", "template": None, "train_on": "all"}
CHAT = {"format": "chat", "template": "tokenizer", "train_on": "assistant"}
COMPLETIONS_RAW = {"format": "completions", "template": None, "train_on": "completions"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.parent


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("pc") / "test.jsonl", [{"prompt": p, "completion": c} for p, c in QA])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("text") / "test.jsonl", [{"text": p + c} for p, c in QA])


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_model(GenerateSettings(model=str(tiny_model))).tokenizer


@pytest.fixture(scope="module")
def base_adapter(tiny_model, tmp_path_factory):
    return random_adapter_dir(tiny_model, tmp_path_factory.mktemp("adapter") / "plain")


def with_rendering(adapter: Path, directory: Path, rendering: dict | None) -> Path:
    """A copy of `adapter` whose config records `rendering` (as `lorakit train` writes it), or nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    if rendering is not None:
        config["lorakit"]["rendering"] = rendering
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


class Capture:
    """Stands in for generation (answers "x") and watches the loss: the token ids each is handed."""

    def __init__(self, monkeypatch, module=ev):
        self.prompts: list[list[list[int]]] = []
        self.examples: list[list[tuple[list[int], list[bool]]]] = []
        original = ev.example_losses

        def fake_batch(model, tokenizer, prompts, sampling, max_tokens, stop=(), seed=None, batch_size=8,
                       on_result=None):
            self.prompts.append([list(p) for p in prompts])
            return [gen.Generation("x", len(p), 1, 1.0, 1.0, 0.0, "stop") for p in prompts]

        def losses(model, examples, *args, **kwargs):
            self.examples.append([(e.tokens.tolist(), e.mask.tolist()) for e in examples])
            return original(model, examples, *args, **kwargs)

        def fake_one(model, tokenizer, tokens, *args, **kwargs):
            self.prompts.append([list(tokens)])
            return gen.Generation("x", len(tokens), 1, 1.0, 1.0, 0.0, "stop")

        monkeypatch.setattr(module, "generate_batch", fake_batch)
        if module is ev:
            monkeypatch.setattr(ev, "example_losses", losses)
        else:
            monkeypatch.setattr(module, "generate_one", fake_one)


def chatml(prompt: str, completion: str | None = None) -> str:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if completion is None else text + f"{completion}<|im_end|>\n"


def raw_loss_example(tok, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """prompt + completion + eos, loss on the completion and eos only (training's rendering without a template)."""
    tokens = tok.encode(prompt + completion, add_special_tokens=False)
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    return tokens + [tok.eos_token_id], [False] * n_prompt + [True] * (len(tokens) - n_prompt + 1)


def run_eval(model, data, out, max_tokens=2, **kw):
    return ev.run(EvalSettings(model=str(model), data=data, out=out, generate=True, max_tokens=max_tokens, **kw),
                  RecordingReporter())


# ---- eval ---------------------------------------------------------------------------------------------------

def test_text_trained_adapter_is_scored_on_raw_prompts(tiny_model, tok, pc_data, base_adapter, tmp_path,
                                                       monkeypatch):
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    capture = Capture(monkeypatch)
    result = run_eval(tiny_model, pc_data, tmp_path / "o", adapter_path=adapter, compare_base=True)
    raw = [tok.encode(p) for p, _ in QA]
    assert capture.prompts == [raw, raw]  # base and adapter alike: the raw prompt, no template
    expected = [raw_loss_example(tok, p, c) for p, c in QA]
    assert capture.examples == [expected, expected]
    assert result.rendering["template"] is None and result.rendering["trained"] == TEXT
    assert result.rendering["description"] == "raw text (as the adapter was trained: text)"
    saved = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert saved["rendering"] == result.rendering


def test_chat_trained_adapter_is_scored_through_its_template(tiny_model, tok, pc_data, base_adapter, tmp_path,
                                                             monkeypatch):
    adapter = with_rendering(base_adapter, tmp_path / "chat", CHAT)
    capture = Capture(monkeypatch)
    result = run_eval(tiny_model, pc_data, tmp_path / "o", adapter_path=adapter)
    assert capture.prompts == [[tok.encode(chatml(p), add_special_tokens=False) for p, _ in QA]]
    tokens = [t for t, _ in capture.examples[0]]
    assert tokens == [tok.encode(chatml(p, c), add_special_tokens=False) for p, c in QA]
    assert result.rendering["template"] == "tokenizer"


@pytest.mark.parametrize("rendering", [None, "no adapter"])
def test_without_a_record_the_tokenizers_template_stays(tiny_model, tok, pc_data, base_adapter, tmp_path,
                                                       monkeypatch, rendering):
    """Adapters of older lorakit or mlx-lm (no record), and no adapter at all: today's behaviour."""
    kw = {} if rendering else {"adapter_path": with_rendering(base_adapter, tmp_path / "old", None)}
    capture = Capture(monkeypatch)
    result = run_eval(tiny_model, pc_data, tmp_path / "o", **kw)
    assert capture.prompts == [[tok.encode(chatml(p), add_special_tokens=False) for p, _ in QA]]
    assert result.rendering["template"] == "tokenizer"
    assert ("without an adapter" if rendering else "the adapter does not say") in result.rendering["reason"]


@pytest.mark.parametrize("trained, flag, chat", [(TEXT, True, True), (CHAT, False, False),
                                                 (COMPLETIONS_RAW, True, True), (None, False, False)])
def test_flags_override_the_adapter_both_ways(tiny_model, tok, pc_data, base_adapter, tmp_path, monkeypatch,
                                              trained, flag, chat):
    adapter = with_rendering(base_adapter, tmp_path / "a", trained)
    capture = Capture(monkeypatch)
    result = run_eval(tiny_model, pc_data, tmp_path / "o", adapter_path=adapter, chat_template=flag)
    prompts = [tok.encode(chatml(p), add_special_tokens=False) if chat else tok.encode(p) for p, _ in QA]
    assert capture.prompts == [prompts]
    losses = [(tok.encode(chatml(p, c), add_special_tokens=False) if chat else raw_loss_example(tok, p, c)[0])
              for p, c in QA]
    assert [t for t, _ in capture.examples[0]] == losses
    assert result.rendering["reason"] == ("--chat-template" if flag else "--no-chat-template")


def test_a_named_template(tiny_model, tok, pc_data, base_adapter, tmp_path, monkeypatch):
    """--template NAME, and an adapter trained on text that `prepare --format text --template NAME` rendered."""
    def alpaca(prompt, completion=None):
        messages = [{"role": "user", "content": prompt}]
        if completion is not None:
            messages.append({"role": "assistant", "content": completion})
        return render(messages, BUILTIN_TEMPLATES["alpaca"], add_generation_prompt=completion is None,
                      eos_token=tok.eos_token)

    named = with_rendering(base_adapter, tmp_path / "named", {"format": "text", "template": "alpaca",
                                                              "train_on": "all"})
    for kw in ({"template": "alpaca"}, {"adapter_path": named}, {"adapter_path": named, "chat_template": True}):
        capture = Capture(monkeypatch)
        result = run_eval(tiny_model, pc_data, tmp_path / "o", overwrite=True, **kw)
        assert capture.prompts == [[tok.encode(alpaca(p), add_special_tokens=False) for p, _ in QA]], kw
        assert [t for t, _ in capture.examples[0]] == [tok.encode(alpaca(p, c), add_special_tokens=False)
                                                       for p, c in QA]
        assert result.rendering["template"] == "alpaca"
    with pytest.raises(UserError, match="--template .*--no-chat-template"):
        run_eval(tiny_model, pc_data, tmp_path / "x", template="alpaca", chat_template=False)
    with pytest.raises(UserError, match="unknown template"):
        run_eval(tiny_model, pc_data, tmp_path / "x", template="no-such-template")


def test_chat_records_with_a_raw_rendering_are_refused_before_loading(tiny_model, base_adapter, tmp_path):
    chats = _write(tmp_path / "chat" / "test.jsonl", [{"messages": [{"role": "user", "content": p},
                                                                    {"role": "assistant", "content": c}]}
                                                      for p, c in QA])
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    with pytest.raises(UserError, match=r"chat records need a chat template.*--chat-template"):
        run_eval(Path("not-loaded"), chats, tmp_path / "o", adapter_path=adapter)
    with pytest.raises(UserError, match=r"chat records need a chat template.*--no-chat-template"):
        run_eval(Path("not-loaded"), chats, tmp_path / "o", chat_template=False)


# ---- --prompt-delimiter -------------------------------------------------------------------------------------

def test_prompt_delimiter_splits_text_records(tiny_model, tok, text_data, base_adapter, tmp_path, monkeypatch):
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    capture = Capture(monkeypatch)
    result = run_eval(tiny_model, text_data, tmp_path / "o", adapter_path=adapter, prompt_delimiter="\nA:")
    assert capture.prompts == [[tok.encode(p) for p, _ in QA]]  # up to and including the delimiter, raw
    # the loss is the text record's, as trained: every token, eos appended
    assert [t for t, _ in capture.examples[0]] == [tok.encode(p + c) + [tok.eos_token_id] for p, c in QA]
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["input"], r["reference"]) for r in rows] == QA
    assert result.rendering["template"] is None and "text records" in result.rendering["description"]


def test_prompt_delimiter_takes_the_last_occurrence_and_shell_escapes(tiny_model, tok, tmp_path, monkeypatch):
    data = _write(tmp_path / "d" / "test.jsonl", [{"text": "Q: 1?\nA: one\nQ: 2?\nA: two"}])
    capture = Capture(monkeypatch)
    run_eval(tiny_model, data, tmp_path / "o", prompt_delimiter="\\nA:")  # as typed: '\nA:' in a shell
    assert capture.prompts == [[tok.encode("Q: 1?\nA: one\nQ: 2?\nA:")]]


def test_prompt_delimiter_problems(tiny_model, text_data, pc_data, tmp_path):
    bad = _write(tmp_path / "bad" / "test.jsonl", [{"text": QA[0][0] + QA[0][1]}, {"text": "no answer marker"}])
    with pytest.raises(UserError, match=r"bad/test.jsonl:2: no --prompt-delimiter '\\nA:'"):
        run_eval(Path("not-loaded"), bad, tmp_path / "o", prompt_delimiter="\nA:")
    with pytest.raises(UserError, match=r"pc.*test.jsonl:1: --prompt-delimiter splits 'text' records"):
        run_eval(Path("not-loaded"), pc_data, tmp_path / "o", prompt_delimiter="\nA:")
    with pytest.raises(UserError, match="--prompt-delimiter .*pass --generate"):
        ev.run(EvalSettings(model="not-loaded", data=text_data, prompt_delimiter="\nA:"), Reporter())
    with pytest.raises(UserError, match="nothing follows --prompt-delimiter"):
        run_eval(Path("not-loaded"), text_data, tmp_path / "o", prompt_delimiter="'")
    assert not (tmp_path / "o").exists()


def test_cli_prompt_delimiter_error_is_exit_2_naming_file_and_line(tiny_model, tmp_path):
    bad = _write(tmp_path / "bad" / "test.jsonl", [{"text": QA[0][0] + QA[0][1]}, {"text": "no marker"}])
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model), "--data", str(bad), "--generate",
                                      "--prompt-delimiter", "\\nA:", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{bad}/test.jsonl:2: no --prompt-delimiter" in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


def test_cli_names_the_rendering_in_one_line(tiny_model, pc_data, base_adapter, tmp_path):
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    args = ["eval", "--model", str(tiny_model), "--data", str(pc_data), "--adapter-path", str(adapter)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("prompts: ")]
    assert lines == ["prompts: raw text (as the adapter was trained: text)"]
    forced = CliRunner().invoke(app, [*args, "--chat-template", "--out", str(tmp_path / "f"), "--json"])
    assert json.loads(forced.stdout)["rendering"]["template"] == "tokenizer"


# ---- generate -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trained, flag, chat", [(TEXT, None, False), (COMPLETIONS_RAW, None, False),
                                                 (CHAT, None, True), (None, None, True),
                                                 (TEXT, True, True), (CHAT, False, False)])
def test_generate_renders_as_the_adapter_was_trained(tiny_model, tok, base_adapter, tmp_path, monkeypatch,
                                                     trained, flag, chat):
    adapter = with_rendering(base_adapter, tmp_path / "a", trained)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in QA))
    expected = [tok.encode(chatml(p), add_special_tokens=False) if chat else tok.encode(p) for p, _ in QA]
    capture = Capture(monkeypatch, module=g)
    kw = {} if flag is None else {"chat_template": flag}
    result = g.run(GenerateSettings(model=str(tiny_model), adapter_path=adapter, input=prompts, **kw), Reporter())
    single = g.run(GenerateSettings(model=str(tiny_model), adapter_path=adapter, prompt=QA[0][0], **kw),
                   Reporter())
    assert capture.prompts == [expected, expected[:1]]
    assert result.rendering == single.rendering and result.rendering["template"] == ("tokenizer" if chat else None)


def test_generate_system_needs_a_template(tiny_model, base_adapter, tmp_path):
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    with pytest.raises(UserError, match=r"--system needs a chat template.*as the adapter was trained"):
        g.run(GenerateSettings(model="not-loaded", adapter_path=adapter, prompt="hi", system="s"), Reporter())
    with pytest.raises(UserError, match="--template .*--no-chat-template"):
        g.run(GenerateSettings(model="not-loaded", prompt="hi", template="chatml", chat_template=False), Reporter())


def test_generate_and_eval_give_the_same_answers_for_a_text_trained_adapter(tiny_model, pc_data, text_data,
                                                                           base_adapter, tmp_path):
    """Real greedy generation: eval --generate on prompt/completion records, eval --prompt-delimiter on the
    text split and generate on the raw prompts answer alike, with no flag passed."""
    adapter = with_rendering(base_adapter, tmp_path / "text", TEXT)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in QA))
    answers = g.run(GenerateSettings(model=str(tiny_model), adapter_path=adapter, input=prompts, max_tokens=6),
                    Reporter()).results
    for data, kw in ((pc_data, {}), (text_data, {"prompt_delimiter": "\nA:"})):
        run_eval(tiny_model, data, tmp_path / "o", max_tokens=6, adapter_path=adapter, overwrite=True, **kw)
        rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
        assert [r["output"] for r in rows] == [a["text"] for a in answers]


# ---- what the adapter records -------------------------------------------------------------------------------

def test_rendering_of_a_training_split(tiny_model, tok, tmp_path):
    def split(rows, manifest=None):
        d = _write(tmp_path / f"d{len(list(tmp_path.iterdir()))}" / "train.jsonl", rows)
        if manifest is not None:
            (d / "manifest.json").write_text(json.dumps(manifest))
        return load_split(d, "train", tok, "auto", 512, cache_dir=tmp_path / "cache")

    text = split([{"text": "a b c"}])
    assert rendering_of(text, tok) == TEXT
    pc = split([{"prompt": "p", "completion": "c"}])
    assert rendering_of(pc, tok) == {"format": "completions", "template": "tokenizer", "train_on": "completions"}
    no_template = type("NoTemplate", (), {"chat_template": None})()
    assert rendering_of(pc, no_template)["template"] is None
    chats = split([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert rendering_of(chats, tok) == CHAT
    rendered = split([{"text": chatml("q", "a")}], {"output_format": "text", "formats": {"chat": 1},
                                                     "template": "chatml"})
    assert rendering_of(rendered, tok) == {"format": "text", "template": "chatml", "train_on": "all"}
    passthrough = split([{"text": "plain"}], {"output_format": "text", "formats": {"text": 1},
                                              "template": "chatml"})
    assert rendering_of(passthrough, tok)["template"] is None


def test_the_adapter_config_keeps_the_rendering(tiny_model):
    settings = TrainSettings(model=str(tiny_model), data=Path("unused"))
    loaded = load_model(settings)
    config = adapter_config(settings, loaded, {}, rendering=TEXT)
    assert config["lorakit"]["rendering"] == TEXT and trained_rendering(config) == TEXT
    assert "rendering" not in adapter_config(settings, loaded, {})["lorakit"]
    assert trained_rendering({"model": "mlx-lm's own"}) is None
    assert trained_rendering({"lorakit": {"rendering": {"format": "odd"}}}) is None


def test_train_records_the_rendering_and_eval_uses_it(tiny_model, tok, pc_data, tmp_path, monkeypatch):
    from lorakit.engine import train

    data = _write(tmp_path / "data" / "train.jsonl", [{"text": p + c} for p, c in QA * 4])
    train.run(TrainSettings(model=str(tiny_model), data=data, adapter_path=tmp_path / "run", iters=2,
                            batch_size=2), Reporter())
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["lorakit"]["rendering"] == TEXT
    capture = Capture(monkeypatch)
    run_eval(tiny_model, pc_data, tmp_path / "o", adapter_path=tmp_path / "run")
    assert capture.prompts == [[tok.encode(p) for p, _ in QA]]
    assert np.array_equal(capture.examples[0][0][0], raw_loss_example(tok, *QA[0])[0])
