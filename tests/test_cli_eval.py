"""`lorakit eval` through the real Typer app: exit codes, stdout JSON, stderr progress and errors."""

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine.data.formats import judge_messages

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_judge")
    rows = []
    for q, a, b, v in [("2 + 2?", "4", "5", "A"), ("Capital of France?", "Rome", "Paris", "B"),
                       ("3 x 3?", "9", "nine", "tie"), ("Say hi.", "Hi!", "Go away.", "A")]:
        rows.append({"messages": judge_messages(q, a, b, "Checked.", v), "question": q, "answer_a": a,
                     "answer_b": b, "verdict": v})
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_json_output_is_eval_json(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(data), "--judge",
                                 "--max-tokens", "3", "--limit", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "eval.json").read_text())
    assert printed["examples"] == 3 and printed["split_examples"] == 4
    assert set(printed["results"]["base"]) == {"loss", "judge"}
    assert printed["results"]["base"]["judge"]["examples"] == 3
    assert printed["settings"]["limit"] == 3
    assert "eval: test (3 examples)" in result.stderr and "judge.consistency" in result.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3

    again = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(data), "--out", str(out)])
    assert again.exit_code == 2
    assert "--overwrite" in again.stderr


def test_plain_output_and_quiet(tiny_model, data, tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(data), "--out",
                                 str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("base: loss=")
    assert "eval.json" in result.stdout
    assert "eval: test" not in result.stderr  # no table with --quiet


def test_bad_input_exits_2(tiny_model, data, tmp_path):
    missing = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(data), "--split", "valid",
                                  "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2
    assert "no valid.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    pattern = runner.invoke(app, ["eval", "--model", str(tiny_model), "--data", str(data), "--generate",
                                  "--label-pattern", r"Class: (\w+)", "--out", str(tmp_path / "o")])
    assert pattern.exit_code == 2
    assert "found no label in any reference" in pattern.stderr
    no_model = runner.invoke(app, ["eval", "--data", str(data)])
    assert no_model.exit_code == 2 and "--model" in no_model.stderr


def test_help_lists_the_options():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for flag in ("--judge-template", "--compare-base", "--label-pattern", "--labels", "--limit", "--split"):
        assert flag in result.stdout
