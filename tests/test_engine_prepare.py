import json
from collections import Counter
from pathlib import Path

import pytest

from lorakit.engine.data.formats import JUDGE_PROMPT
from lorakit.engine.data.split import assign
from lorakit.engine.prepare import run
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import UserError
from lorakit.settings import PrepareSettings

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(inputs, out, **kw):
    settings = PrepareSettings(inputs=[str(p) for p in inputs], out=out, **kw)
    reporter = RecordingReporter()
    return run(settings, reporter), reporter


def rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def all_rows(out):
    return [r for name in ("train", "valid", "test") for r in rows(out / f"{name}.jsonl")]


def qa(i):
    return {"prompt": f"Question number {i}: how do I {['charge', 'fold', 'lock', 'clean'][i % 4]} it?",
            "completion": f"Answer {i}."}


# ------------------------------------------------------------ formats


def test_every_format_becomes_a_chat(tmp_path):
    tools = [{"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}]
    src = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "system": "Be kind.", "tools": tools},
        {"conversations": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "Q?"},
                           {"from": "gpt", "value": "A."}]},
        {"prompt": "P?", "completion": "C."},
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"question": "2+2?", "answer_a": "4", "answer_b": "5", "reasoning": "A is right.", "verdict": "a"},
    ])
    result, _ = prepare([src], tmp_path / "out", split=(1.0, 0.0, 0.0))
    assert result.formats == {"alpaca": 2, "chat": 1, "completions": 1, "judge": 1, "sharegpt": 1}
    got = {json.dumps(r["messages"][0]): r for r in rows(tmp_path / "out" / "train.jsonl")}
    chat = got[json.dumps({"role": "system", "content": "Be kind."})]
    assert chat["tools"] == tools and [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
    assert got[json.dumps({"role": "system", "content": "Sys"})]["messages"][1] == {"role": "user", "content": "Q?"}
    assert got[json.dumps({"role": "user", "content": "P?"})]["messages"][1]["content"] == "C."
    assert json.dumps({"role": "user", "content": "Translate to French\n\ncat"}) in got
    assert json.dumps({"role": "user", "content": "Say hi"}) in got
    judge = got[json.dumps({"role": "user", "content": JUDGE_PROMPT.format(question="2+2?", answer_a="4",
                                                                         answer_b="5")})]
    assert judge["messages"][-1] == {"role": "assistant", "content": "A is right.\n\nVerdict: A"}
    assert judge["verdict"] == "A" and judge["answer_b"] == "5"


def test_text_records_stay_text(tmp_path):
    result, _ = prepare([SAMPLE / "text.jsonl"], tmp_path / "out")
    assert result.formats == {"text": 100}
    assert all(set(r) == {"text"} for r in all_rows(tmp_path / "out"))


def test_json_array_input_with_line_numbers(tmp_path):
    src = tmp_path / "data.json"
    src.write_text('[\n  {"prompt": "a?", "completion": "b"},\n  {"prompt": "c?",\n   "completion": ""}\n]\n')
    with pytest.raises(UserError, match=r"data\.json:3: 'completion' is empty"):
        prepare([src], tmp_path / "out")
    src.write_text('[{"prompt": "a?", "completion": "b"}, {"prompt": "c?", "completion": "d"}]')
    result, _ = prepare([src], tmp_path / "out2", split=(1.0, 0.0, 0.0))
    assert result.counts["train"] == 2
    src.write_text('{"prompt": "a?", "completion": "b"}')
    with pytest.raises(UserError, match="array of records"):
        prepare([src], tmp_path / "out3")


def test_input_format_override_and_field_map(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)])
    with pytest.raises(UserError, match="unknown record format"):
        prepare([src], tmp_path / "out")
    result, _ = prepare([src], tmp_path / "out", field_map=["prompt=question", "completion=answer"])
    assert result.formats == {"completions": 10}
    # a record with messages, forced to be read as plain text, fails on the missing text field
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [], "text": "just text"}])
    result, _ = prepare([chat], tmp_path / "out2", input_format="text", split=(1.0, 0.0, 0.0))
    assert rows(tmp_path / "out2" / "train.jsonl") == [{"text": "just text"}]
    renamed = write_jsonl(tmp_path / "r.jsonl", [{"dialog": [{"speaker": "user", "text": "hi"},
                                                             {"speaker": "assistant", "text": "yo"}]}])
    prepare([renamed], tmp_path / "out3", field_map=["messages=dialog", "role=speaker", "content=text"],
            split=(1.0, 0.0, 0.0))
    assert rows(tmp_path / "out3" / "train.jsonl")[0]["messages"][1] == {"role": "assistant", "content": "yo"}
    with pytest.raises(UserError, match="--field-map 'bogus'"):
        prepare([src], tmp_path / "out4", field_map=["bogus"])


def test_system_option_added_where_missing(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [qa(0), {"messages": [
        {"role": "system", "content": "Own"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    prepare([src], tmp_path / "out", system="House style.", split=(1.0, 0.0, 0.0))
    systems = sorted(r["messages"][0]["content"] for r in rows(tmp_path / "out" / "train.jsonl"))
    assert systems == ["House style.", "Own"]


# ------------------------------------------------------------ validation rules


@pytest.mark.parametrize("record, reason", [
    ('{"prompt": "a", ', "invalid JSON"),
    ('["prompt"]', "expected a JSON object, got list"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
     "'content' must be a string"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"prompt": 1, "completion": "x"}, "'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \t"}]}, "empty"),
    ({"text": "   "}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "unknown speaker"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, "two user turns in a row"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}, "only come first"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no user turn"),
    ({"question": "q", "answer_a": "a", "answer_b": "b", "verdict": "C"}, "must be A, B or tie"),
    ({"instruction": "do", "output": 3}, "'output' must be a string"),
    ({"foo": "bar"}, "unknown record format"),
])
def test_each_rule_names_file_line_and_reason(tmp_path, record, reason):
    src = write_jsonl(tmp_path / "bad.jsonl", [qa(0), record])
    with pytest.raises(UserError) as e:
        prepare([src], tmp_path / "out")
    assert "bad.jsonl:2: " in str(e.value) and reason in str(e.value)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid UTF-8"):
        prepare([src], tmp_path / "out")


def test_too_long_by_chars(tmp_path):
    src = write_jsonl(tmp_path / "long.jsonl", [qa(0), {"prompt": "x" * 500, "completion": "y"}])
    with pytest.raises(UserError, match=r"long\.jsonl:2: too long: 501 characters \(--max-chars 100\)"):
        prepare([src], tmp_path / "out", max_chars=100)


def test_too_long_by_tokens(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "long.jsonl", [qa(0), {"prompt": "word " * 300, "completion": "y"}])
    with pytest.raises(UserError, match=r"long\.jsonl:2: too long: \d+ tokens \(--max-tokens 100\)"):
        prepare([src], tmp_path / "out", max_tokens=100, tokenizer=str(tiny_model))
    with pytest.raises(UserError, match="--max-tokens needs a tokenizer"):
        prepare([src], tmp_path / "out", max_tokens=100)


def test_duplicates_after_whitespace_normalisation(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [qa(0), qa(1), {"prompt": qa(0)["prompt"].replace(" ", "  ") + "\n",
                                                           "completion": " Answer 0. "}])
    with pytest.raises(UserError, match=r"d\.jsonl:3: duplicate of .*d\.jsonl:1"):
        prepare([src], tmp_path / "out")
    result, _ = prepare([src], tmp_path / "out", dedupe=False)
    assert sum(result.counts[s] for s in ("train", "valid", "test")) == 3


def test_duplicates_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [qa(7), qa(3)])
    with pytest.raises(UserError, match=r"b\.jsonl:2: duplicate of .*a\.jsonl:4"):
        prepare([a, b], tmp_path / "out")


def test_all_problems_listed_together(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [qa(0), {"text": ""}, qa(1), "{oops", {"x": 1}])
    with pytest.raises(UserError) as e:
        prepare([src], tmp_path / "out")
    message = str(e.value)
    assert "3 bad record(s) of 5" in message
    assert all(f"bad.jsonl:{n}:" in message for n in (2, 4, 5))


# ------------------------------------------------------------ error policy


def test_skip_writes_rejected_with_reasons(tmp_path):
    result, reporter = prepare([SAMPLE / "broken" / "some_bad.jsonl"], tmp_path / "out", on_error="skip")
    assert result.counts["rejected"] == 1 and result.records_read == 31
    assert sum(result.counts[s] for s in ("train", "valid", "test")) == 30
    (rejected,) = rows(tmp_path / "out" / "rejected.jsonl")
    assert rejected["line"] == 18 and "empty" in rejected["reason"] and rejected["record"]["completion"] == ""
    assert any(kind == "warn" and "rejected.jsonl" in msg for kind, msg in reporter.events)


def test_skip_keeps_raw_text_of_unparseable_lines(tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", [qa(i) for i in range(40)] + ['{"prompt": broken'])
    prepare([src], tmp_path / "out", on_error="skip")
    (rejected,) = rows(tmp_path / "out" / "rejected.jsonl")
    assert rejected == {"file": str(src), "line": 41, "reason": rejected["reason"], "raw": '{"prompt": broken'}


def test_skip_fails_above_max_error_rate(tmp_path):
    src = write_jsonl(tmp_path / "b.jsonl", [qa(i) for i in range(9)] + [{"text": " "}])
    with pytest.raises(UserError, match=r"1 of 10 records \(10\.0%\) are invalid, more than --max-error-rate 0\.05"):
        prepare([src], tmp_path / "out", on_error="skip")
    result, _ = prepare([src], tmp_path / "out", on_error="skip", max_error_rate=0.2)
    assert result.counts["rejected"] == 1


def test_mixing_text_and_chat_needs_format_text(tmp_path):
    with pytest.raises(UserError, match="mix plain-text records"):
        prepare([SAMPLE / "text.jsonl", SAMPLE / "support.jsonl"], tmp_path / "out")


# ------------------------------------------------------------ templates and tokens


def test_format_text_through_builtin_template(tmp_path):
    prepare([SAMPLE / "chat.jsonl"], tmp_path / "out", format="text", template="llama3")
    texts = [r["text"] for r in all_rows(tmp_path / "out")]
    assert len(texts) == 100
    # the tokenizer adds BOS when mlx-lm encodes the text, so the text itself starts after it
    assert all(t.startswith("<|start_header_id|>system<|end_header_id|>\n\n") for t in texts)
    assert all(t.endswith("<|eot_id|>") for t in texts)


def test_format_text_needs_a_template(tmp_path):
    with pytest.raises(UserError, match="--format text renders chats through a chat template"):
        prepare([SAMPLE / "support.jsonl"], tmp_path / "out", format="text")


def test_tokenizer_template_and_token_counts(tmp_path, tiny_model):
    result, _ = prepare([SAMPLE / "support.jsonl"], tmp_path / "out", model=str(tiny_model), format="text")
    text = rows(tmp_path / "out" / "train.jsonl")[0]["text"]
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    tokens = result.lengths["tokens"]
    assert 0 < tokens["min"] <= tokens["p50"] <= tokens["p95"] <= tokens["max"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["template"] == "tokenizer" and manifest["lengths"]["tokens"] == tokens


def test_template_refusal_is_a_record_problem(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "calling", "tool_calls": [{"name": "x"}]},
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]}])
    with pytest.raises(UserError, match=r"t\.jsonl:1: chat template: .*alternate.*\(template gemma\)"):
        prepare([src], tmp_path / "out", format="text", template="gemma")


# ------------------------------------------------------------ splitting


def test_split_ratios_and_byte_identical_outputs(tmp_path):
    inputs = [SAMPLE / "support.jsonl", SAMPLE / "chat.jsonl"]
    first, _ = prepare(inputs, tmp_path / "a", seed=3)
    prepare(inputs, tmp_path / "b", seed=3)
    assert first.counts == {"train": 237, "valid": 29, "test": 30, "rejected": 0}
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prepare(inputs, tmp_path / "c", seed=4)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    # nothing lost, nothing shared
    keys = [json.dumps(r, sort_keys=True) for r in all_rows(tmp_path / "a")]
    assert len(keys) == len(set(keys)) == 296


def test_judge_records_are_stratified_by_verdict(tmp_path):
    result, _ = prepare([SAMPLE / "judge.jsonl"], tmp_path / "out", stratify_by="verdict", seed=11)
    assert result.labels == {"train": {"A": 40, "B": 40, "tie": 40}, "valid": {"A": 5, "B": 5, "tie": 5},
                             "test": {"A": 5, "B": 5, "tie": 5}}
    for name, counts in result.labels.items():
        assert Counter(r["verdict"] for r in rows(tmp_path / "out" / f"{name}.jsonl")) == counts


def test_stratify_by_any_field(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{**qa(i), "topic": "battery" if i % 4 == 0 else "other"}
                                             for i in range(80)])
    result, _ = prepare([src], tmp_path / "out", stratify_by="topic", split=(0.5, 0.25, 0.25))
    assert result.labels["valid"] == {"battery": 5, "other": 15}
    assert result.labels["test"] == {"battery": 5, "other": 15}
    src = write_jsonl(tmp_path / "m.jsonl", [qa(0)])
    with pytest.raises(UserError, match="--stratify-by topic: the record has no field 'topic'"):
        prepare([src], tmp_path / "out2", stratify_by="topic")


def test_group_by_keeps_groups_in_one_split(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{**qa(i), "customer": f"c{i % 13}"} for i in range(130)])
    prepare([src], tmp_path / "out", group_by="customer")
    where = {}
    for name in ("train", "valid", "test"):
        for r in rows(tmp_path / "out" / f"{name}.jsonl"):
            number = int(r["messages"][0]["content"].split()[2].rstrip(":"))
            where.setdefault(f"c{number % 13}", set()).add(name)
    assert len(where) == 13 and all(len(s) == 1 for s in where.values())


def test_same_prompt_in_two_splits_is_reported(tmp_path):
    records = [{**qa(i), "conv": f"g{i}"} for i in range(40)]
    records += [{"prompt": qa(i)["prompt"], "completion": "another answer", "conv": f"h{i}"} for i in range(40)]
    src = write_jsonl(tmp_path / "leak.jsonl", records)
    with pytest.raises(UserError, match=r"same prompt as .*leak\.jsonl:\d+, but that one is in train"):
        prepare([src], tmp_path / "out", group_by="conv")
    result, _ = prepare([src], tmp_path / "out", group_by="conv", on_error="skip")
    rejected = rows(tmp_path / "out" / "rejected.jsonl")
    assert rejected and all("same prompt" in r["reason"] for r in rejected)
    prompts = {name: {r["messages"][0]["content"] for r in rows(tmp_path / "out" / f"{name}.jsonl")}
               for name in ("train", "valid", "test")}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["valid"])
    # without --group-by, same-prompt records are grouped automatically and never leak
    result, _ = prepare([src], tmp_path / "out2")
    assert result.counts["rejected"] == 0


def test_assign_is_order_independent():
    groups = [f"g{i}" for i in range(100)]
    labels = [None] * 100
    first = dict(zip(groups, assign(groups, labels, (0.8, 0.1, 0.1), seed=0)))
    second = dict(zip(groups[::-1], assign(groups[::-1], labels, (0.8, 0.1, 0.1), seed=0)))
    assert first == second and Counter(first.values()) == {0: 80, 1: 10, 2: 10}


# ------------------------------------------------------------ outputs


def test_manifest(tmp_path):
    result, _ = prepare([SAMPLE / "support.jsonl", SAMPLE / "judge.jsonl"], tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["records"] for i in manifest["inputs"]] == [196, 150]
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    assert manifest["counts"] == result.counts and sum(manifest["counts"].values()) == 346
    assert manifest["formats"] == {"completions": 196, "judge": 150}
    assert manifest["label_field"] == "verdict"
    chars = manifest["lengths"]["chars"]
    assert chars["min"] <= chars["p50"] <= chars["p95"] <= chars["max"] and manifest["lengths"]["tokens"] is None
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["split"] == [0.8, 0.1, 0.1]
    assert set(manifest["files"]) == {"train.jsonl", "valid.jsonl", "test.jsonl"}
    assert (tmp_path / "out" / "lorakit.yaml").exists()


def test_refuses_non_empty_out_and_replaces_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        prepare([SAMPLE / "support.jsonl"], out)
    assert (out / "keep.txt").read_text() == "precious"
    prepare([SAMPLE / "support.jsonl"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "train.jsonl").exists()


def test_failed_run_leaves_previous_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    prepare([SAMPLE / "support.jsonl"], out)
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(UserError):
        prepare([SAMPLE / "broken" / "unknown_role.jsonl"], out, overwrite=True)
    assert (out / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_failure_cleans_staging(tmp_path, monkeypatch):
    import lorakit.engine.prepare as prep

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prep, "replace_dir", boom)
    with pytest.raises(OSError):
        prepare([SAMPLE / "support.jsonl"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_same_data_gives_the_same_files_wherever_it_lies(tmp_path):
    data = [qa(i) for i in range(40)]
    for where in ("a/deep/dir", "b"):
        (tmp_path / where).mkdir(parents=True)
        write_jsonl(tmp_path / where / "data.jsonl", data)
        prepare([tmp_path / where / "data.jsonl"], tmp_path / f"out-{where.replace('/', '-')}")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        a, b = (tmp_path / "out-a-deep-dir" / name), (tmp_path / "out-b" / name)
        assert a.read_bytes() == b.read_bytes(), name
