import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
BROKEN = SAMPLE / "broken"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["prepare", *map(str, args)])


# (file, extra flags, line, reason) for every deliberately broken sample file
BROKEN_CASES = [
    ("bad_json.jsonl", [], 3, "invalid JSON (Unterminated string"),
    ("not_an_object.jsonl", [], 2, "expected a JSON object, got list"),
    ("wrong_types.jsonl", [], 2, "'content' must be a string, got int"),
    ("empty_content.jsonl", [], 2, "empty or whitespace-only content"),
    ("unknown_role.jsonl", [], 2, "unknown role 'bot'"),
    ("no_final_assistant.jsonl", [], 2, "it must end with an assistant turn"),
    ("consecutive_roles.jsonl", [], 2, "two user turns in a row"),
    ("invalid_utf8.jsonl", [], 2, "invalid UTF-8"),
    ("duplicates.jsonl", [], 3, "duplicate of"),
    ("too_long.jsonl", ["--max-chars", "4000"], 2, "too long: 45043 characters"),
    ("unknown_format.jsonl", [], 2, "unknown record format"),
    ("bad_judge.jsonl", [], 2, "'verdict' must be A, B or tie, got 'C'"),
    ("some_bad.jsonl", [], 18, "'completion' is empty"),
]


@pytest.mark.parametrize("name, flags, line, reason", BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_broken_files_exit_2_naming_file_and_line(tmp_path, name, flags, line, reason):
    result = invoke(BROKEN / name, "--out", tmp_path / "out", *flags)
    assert result.exit_code == 2
    assert f"{BROKEN / name}:{line}: " in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_success_prints_summary_on_stdout_and_table_on_stderr(tmp_path):
    result = invoke(SAMPLE / "judge.jsonl", "--out", tmp_path / "out", "--stratify-by", "verdict")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [f"{tmp_path / 'out'}: train 120, valid 15, test 15",
                                          f"manifest: {tmp_path / 'out' / 'manifest.json'}"]
    assert "A=40, B=40, tie=40" in result.stderr and "p95" in result.stderr and "judge=150" in result.stderr


def test_json_output_is_one_object(tmp_path):
    result = invoke(SAMPLE / "support.jsonl", SAMPLE / "chat.jsonl", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {"train": 237, "valid": 29, "test": 30, "rejected": 0}
    assert data["formats"] == {"chat": 100, "completions": 196} and data["records_read"] == 296


def test_quiet_keeps_stderr_empty(tmp_path):
    result = invoke(SAMPLE / "text.jsonl", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""


def test_skip_policy_from_the_cli(tmp_path):
    result = invoke(BROKEN / "some_bad.jsonl", "--out", tmp_path / "out", "--on-error", "skip", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["rejected"] == 1
    assert "set aside 1 record(s) in rejected.jsonl" in result.stderr
    result = invoke(BROKEN / "unknown_role.jsonl", "--out", tmp_path / "out2", "--on-error", "skip")
    assert result.exit_code == 2 and "--max-error-rate" in result.stderr


def test_overwrite_rules(tmp_path):
    out = tmp_path / "out"
    assert invoke(SAMPLE / "text.jsonl", "--out", out).exit_code == 0
    again = invoke(SAMPLE / "text.jsonl", "--out", out)
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
    assert invoke(SAMPLE / "text.jsonl", "--out", out, "--overwrite", "--seed", "5").exit_code == 0


def test_split_flag_and_seed_from_the_cli(tmp_path):
    result = invoke(SAMPLE / "text.jsonl", "--out", tmp_path / "out", "--split", "0.5,0.5,0", "--json")
    assert json.loads(result.stdout)["counts"] == {"train": 50, "valid": 50, "test": 0, "rejected": 0}
    bad = invoke(SAMPLE / "text.jsonl", "--out", tmp_path / "out2", "--split", "0.5,0.6,0")
    assert bad.exit_code == 2 and "--split" in bad.stderr and "sum to 1" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--out", "x"], "INPUT"),
    (["missing.jsonl", "--out", "x"], "missing.jsonl: input file not found"),
    ([str(SAMPLE / "support.jsonl")], "--out"),
    ([str(SAMPLE / "support.jsonl"), "--out", "x", "--template", "vicuna"], "--template vicuna: unknown template"),
    ([str(SAMPLE / "support.jsonl"), "--out", "x", "--format", "text"], "--template"),
    ([str(SAMPLE / "support.jsonl"), "--out", "x", "--input-format", "csv"], "--input-format"),
    ([str(SAMPLE / "support.jsonl"), "--out", "x", "--tokenizer", "nope/tokenizer.json"], "--tokenizer"),
])
def test_bad_flags_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "x").exists()
