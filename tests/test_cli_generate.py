"""`lorakit generate` through the real Typer app: exit codes, stdout, stderr."""

from __future__ import annotations

import json

import pytest
from test_engine_generate import PROMPTS, make_adapter
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.testing import tiny_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("cli_untied") / "model", tie_word_embeddings=False))


def gen(*args: str, input: str | None = None):
    return runner.invoke(app, ["generate", *args], input=input)


def as_json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_prompt_streams_text_to_stdout_and_stats_to_stderr(model):
    result = gen("--model", model, "--prompt", PROMPTS[0], "--max-tokens", "12")
    assert result.exit_code == 0, result.stderr
    expected = as_json(gen("--model", model, "--prompt", PROMPTS[0], "--max-tokens", "12", "--json"))
    assert result.stdout == expected["text"] + "\n"
    assert "prompt:" in result.stderr and "tokens/s" in result.stderr and "peak memory" in result.stderr
    quiet = gen("--model", model, "--prompt", PROMPTS[0], "--max-tokens", "12", "--quiet")
    assert quiet.stdout == result.stdout and "tokens/s" not in quiet.stderr


def test_json_is_one_object_with_text_and_stats(model):
    out = as_json(gen("--model", model, "-p", "hi", "--max-tokens", "6", "--json"))
    assert set(out) >= {"text", "finish_reason", "prompt_tokens", "generation_tokens", "prompt_tps",
                        "generation_tps", "peak_memory"}
    assert out["generation_tokens"] == 6 and out["finish_reason"] == "length"


def test_prompt_from_stdin(model):
    piped = as_json(gen("--model", model, "--prompt", "-", "--max-tokens", "8", "--json", input=PROMPTS[1]))
    direct = as_json(gen("--model", model, "--prompt", PROMPTS[1], "--max-tokens", "8", "--json"))
    assert piped["text"] == direct["text"]


def test_empty_stdin_is_exit_2(model):
    result = gen("--model", model, "--prompt", "-", input="  \n")
    assert result.exit_code == 2 and "empty prompt (nothing on stdin)" in result.stderr


def test_seed_makes_sampling_repeatable(model):
    args = ["--model", model, "-p", PROMPTS[0], "--max-tokens", "24", "--temp", "1.0", "--top-k", "100",
            "--json"]
    texts = [as_json(gen(*args, "--seed", s))["text"] for s in ("5", "5", "6", "7")]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2] or texts[0] != texts[3]


def test_stop_strings_repeated_or_comma_separated(model):
    base = ["--model", model, "-p", PROMPTS[2], "--max-tokens", "40", "--json"]
    full = as_json(gen(*base))["text"]
    stop = full[6:9]
    assert "," not in stop
    for flags in (["--stop", stop], ["--stop", "zzz", "--stop", stop], ["--stop", f"zzz,{stop}"]):
        out = as_json(gen(*base, *flags))
        assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"


def test_stop_strings_keep_their_whitespace():
    from lorakit.settings import GenerateSettings

    assert GenerateSettings(model="m", stop="\n\n, x,,").stop == ["\n\n", " x"]


def test_no_chat_template_uses_raw_text(model):
    args = ["--model", model, "-p", PROMPTS[0], "--max-tokens", "10", "--json"]
    chat, raw = as_json(gen(*args)), as_json(gen(*args, "--no-chat-template"))
    assert raw["prompt_tokens"] < chat["prompt_tokens"]
    bad = gen("--model", model, "-p", "x", "--system", "be nice", "--no-chat-template")
    assert bad.exit_code == 2 and "--system" in bad.stderr


def test_jsonl_input_to_stdout_and_to_file(model, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    result = gen("--model", model, "--input", str(path), "--max-tokens", "8", "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(PROMPTS))]
    single = as_json(gen("--model", model, "-p", PROMPTS[3], "--max-tokens", "8", "--json"))
    assert rows[3]["text"] == single["text"]

    out = tmp_path / "answers.jsonl"
    written = gen("--model", model, "-i", str(path), "-o", str(out), "--max-tokens", "8")
    assert written.exit_code == 0 and written.stdout == ""
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    again = gen("--model", model, "-i", str(path), "-o", str(out))
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    summary = as_json(gen("--model", model, "-i", str(path), "-o", str(out), "--overwrite", "--max-tokens",
                          "8", "--json"))
    assert summary["count"] == len(PROMPTS) and summary["output"] == str(out)


def test_bad_jsonl_line_is_exit_2_naming_file_and_line(model, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    result = gen("--model", model, "--input", str(path))
    assert result.exit_code == 2
    assert "prompts.jsonl:2:" in result.stderr and "'prompt'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_prompt_and_bad_flags_are_exit_2(model):
    assert gen("--model", model).exit_code == 2
    bad_temp = gen("--model", model, "-p", "x", "--temp", "-1")
    assert bad_temp.exit_code == 2 and "--temp" in bad_temp.stderr
    missing = gen("--model", "/nonexistent/model", "-p", "x")
    assert missing.exit_code == 2 and "--model" in missing.stderr
    no_input = gen("--model", model, "--input", "/nonexistent/prompts.jsonl")
    assert no_input.exit_code == 2 and "--input /nonexistent/prompts.jsonl: file not found" in no_input.stderr


def test_adapter_and_compare_base(model, tmp_path):
    adapter = make_adapter(model, tmp_path / "adapters" / "best")
    args = ["--model", model, "-p", PROMPTS[0], "--max-tokens", "10"]
    base = as_json(gen(*args, "--json"))["text"]
    tuned = as_json(gen(*args, "--json", "--adapter-path", str(tmp_path / "adapters")))
    assert tuned["text"] != base and tuned["adapter"] == str(adapter)
    both = as_json(gen(*args, "--json", "--adapter-path", str(adapter), "--compare-base"))
    assert (both["text"], both["base_text"]) == (tuned["text"], base)
    table = gen(*args, "--adapter-path", str(adapter), "--compare-base")
    assert table.exit_code == 0 and "base" in table.stdout and "adapter" in table.stdout


def test_adapter_from_another_base_is_refused(model, tmp_path):
    other = tiny_model_dir(tmp_path / "other", hidden_size=32)
    foreign = make_adapter(other, tmp_path / "foreign")
    result = gen("--model", model, "-p", "hi", "--adapter-path", str(foreign))
    assert result.exit_code == 2
    assert "--adapter-path" in result.stderr and "hidden_size" in result.stderr
