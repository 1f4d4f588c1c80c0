"""The eval engine on the tiny model: loss wiring, judge swap wiring, base vs adapter, limits, bad input."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lorakit.engine import eval as ev
from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.data.formats import judge_messages
from lorakit.engine.model.loading import load_model
from lorakit.engine.model.losses import batch_loss, loss_head
from lorakit.engine.reporter import RecordingReporter, Reporter
from lorakit.errors import UserError
from lorakit.settings import EvalSettings, TrainSettings

# (question, answer_a, answer_b, verdict): the longer answer is the right one except for the ties
JUDGE = [
    ("What is 2 + 2?", "It is 4, because two and two make four.", "5.", "A"),
    ("Capital of France?", "Rome.", "The capital of France is Paris.", "B"),
    ("What is 3 x 3?", "9, three threes.", "3 x 3 = 9.", "tie"),
    ("Reset a password?", "Open Settings, choose Account, then Reset password.", "Call us.", "A"),
    ("Order shipping time?", "Soon.", "Your order ships in 3-5 business days.", "B"),
    ("Say hello.", "Hello there, friend!", "Hello!", "tie"),
]


def _judge_row(q, a, b, verdict, reasoning="Checked the facts."):
    return {"messages": judge_messages(q, a, b, reasoning, verdict), "question": q, "answer_a": a,
            "answer_b": b, "reasoning": reasoning, "verdict": verdict}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def judge_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge_data")
    _write(d / "test.jsonl", [_judge_row(*j) for j in JUDGE])
    return d


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa_data")
    rows = [
        {"prompt": "Capital of France?", "completion": "Label: geo. Paris"},
        {"prompt": "2 + 2?", "completion": "Label: math. 4"},
        {"prompt": "Greet me.", "completion": "Hello!"},  # no label: left out of label accuracy
        {"prompt": "3 x 3?", "completion": "Label: math. 9"},
    ]
    _write(d / "test.jsonl", rows)
    return d


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero B (so it changes the outputs)."""
    from mlx.utils import tree_flatten

    from lorakit.engine.model.adapters import adapter_config, apply_adapters, save_adapter

    settings = TrainSettings(model=str(tiny_model), data=Path("unused"), lora_rank=4)
    loaded = load_model(settings)
    params = apply_adapters(loaded.model, settings)
    mx.random.seed(1)
    updates = [(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(loaded.model.trainable_parameters())
               if k.endswith("lora_b")]
    loaded.model.load_weights(updates, strict=False)
    out = tmp_path_factory.mktemp("adapter") / "run"
    save_adapter(loaded.model, out, adapter_config(settings, loaded, params))
    return out


@dataclass
class _Answer:
    text: str


def _fake_generator(judge):
    """Stands in for generate.generate_batch: decodes each prompt and answers with judge(prompt_text)."""
    calls = []

    def fake(model, tokenizer, prompts, sampling, max_tokens, stop=(), seed=None, batch_size=8, on_result=None):
        texts = [tokenizer.decode(p) for p in prompts]
        calls.append(texts)
        answers = []
        for i, text in enumerate(texts):
            answers.append(_Answer(judge(text)))
            if on_result:
                on_result(i)
        return answers

    fake.calls = calls
    return fake


def _answers(prompt: str) -> tuple[str, str]:
    a = prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    b = prompt.split("Answer B:\n")[1].split("<|im_end|>")[0]
    return a, b


def _settings(model, data, out, **kw) -> EvalSettings:
    return EvalSettings(model=str(model), data=data, out=out, **kw)


def test_row_losses_add_up_to_the_training_loss(tiny_model, judge_data):
    settings = _settings(tiny_model, judge_data, None)
    loaded = load_model(settings)
    path = ev.split_path(judge_data, "test")
    records, n = ev.read_records(settings, path, Reporter())
    examples = ev.loss_examples(settings, loaded, records, n, Reporter())
    head = loss_head(loaded.model)
    for gather in (True, False):
        plan = BatchPlan(examples, 3, 2048, shuffle=False)
        batch = plan.build(0)
        if not gather:
            batch.positions = None
        sums, counts = ev.row_losses(loaded.model, batch, head)
        total, tokens = batch_loss(loaded.model, batch.to_mx(), head)
        assert sums.sum() == pytest.approx(total.item(), rel=1e-5)
        assert counts.sum() == tokens.item()
        # each row's count is its example's loss-bearing tokens (the assistant turn and <|im_end|>)
        members = [row[0] for row in plan.batches[0]]
        assert list(counts) == [examples[i].loss_tokens for i in members]
    # per-example losses do not depend on how examples are batched
    one = ev.example_losses(loaded.model, examples, settings.model_copy(update={"batch_size": 1}), Reporter(), "x")
    four = ev.example_losses(loaded.model, examples, settings.model_copy(update={"batch_size": 4}), Reporter(), "x")
    np.testing.assert_allclose(one[0], four[0], rtol=1e-4)
    np.testing.assert_array_equal(one[1], four[1])


def test_judge_swaps_answers_and_scores_a_position_consistent_judge(tiny_model, judge_data, tmp_path, monkeypatch):
    def longer_wins(prompt):
        a, b = _answers(prompt)
        return f"Answer {'A' if len(a) > len(b) else 'B'} is more complete.\nVerdict: {'A' if len(a) > len(b) else 'B'}"

    fake = _fake_generator(longer_wins)
    monkeypatch.setattr(ev, "generate_batch", fake)
    result = ev.run(_settings(tiny_model, judge_data, tmp_path / "out", judge=True), RecordingReporter())

    prompts = fake.calls[0]
    assert len(prompts) == 2 * len(JUDGE)
    for i, (q, a, b, _) in enumerate(JUDGE):
        assert _answers(prompts[i]) == (a, b)
        assert _answers(prompts[len(JUDGE) + i]) == (b, a)  # the swapped set
    # the default prompt is exactly the training prompt of the split (prepare's judge_messages)
    assert prompts[0].startswith("<|im_start|>user\n" + judge_messages(*JUDGE[0][:3])[0]["content"])
    assert prompts[0].endswith("<|im_start|>assistant\n")

    judge = result.results["base"]["judge"]
    assert judge["accuracy"] == pytest.approx(4 / 6)  # both ties judged wrong
    assert judge["swapped_accuracy"] == pytest.approx(4 / 6)
    assert judge["agreement"] == pytest.approx(4 / 6)
    assert judge["consistency"] == 1.0
    assert judge["position_bias"] == 0.0
    assert judge["unparseable"] == 0
    assert result.results["base"]["loss"]["examples"] == 6

    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["model"] == "base" and rows[0]["line"] == 1
    assert rows[0]["reference"] == "A" and rows[0]["label"] == "A" and rows[0]["correct"] is True
    assert rows[2]["judge_label"] == "A" and rows[2]["judge_label_swapped"] == "B" and rows[2]["judge_consistent"]
    assert rows[0]["loss"] > 0 and rows[0]["loss_tokens"] > 0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["results"]["base"]["judge"]["accuracy"] == judge["accuracy"]
    assert saved["adapter"] is None and saved["model"]["name"] == str(tiny_model)


def test_a_position_biased_judge(tiny_model, judge_data, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "generate_batch", _fake_generator(lambda p: "Verdict: A"))
    judge = ev.run(_settings(tiny_model, judge_data, tmp_path / "o", judge=True), Reporter()).results["base"]["judge"]
    assert judge["consistency"] == 0.0
    assert judge["position_bias"] == 1.0
    assert judge["accuracy"] == pytest.approx(2 / 6)


def test_unparseable_judge_outputs(tiny_model, judge_data, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "generate_batch", _fake_generator(lambda p: "I cannot decide."))
    judge = ev.run(_settings(tiny_model, judge_data, tmp_path / "o", judge=True), Reporter()).results["base"]["judge"]
    assert judge["unparseable"] == 6 and judge["unparseable_swapped"] == 6
    assert judge["accuracy"] == judge["consistency"] == 0.0
    assert judge["bias"]["unparseable"]["predicted"] == 1.0


def test_judge_template_file(tiny_model, judge_data, tmp_path, monkeypatch):
    fake = _fake_generator(lambda p: "Verdict: tie")
    monkeypatch.setattr(ev, "generate_batch", fake)
    template = tmp_path / "judge.j2"
    template.write_text("Q: {{ question }}\nFIRST: {{ answer_a }}\nSECOND: {{ answer_b }}")
    result = ev.run(_settings(tiny_model, judge_data, tmp_path / "o", judge=True, judge_template=str(template)),
                    Reporter())
    assert f"FIRST: {JUDGE[0][1]}\nSECOND: {JUDGE[0][2]}" in fake.calls[0][0]
    assert f"FIRST: {JUDGE[0][2]}\nSECOND: {JUDGE[0][1]}" in fake.calls[0][len(JUDGE)]
    assert result.results["base"]["judge"]["accuracy"] == pytest.approx(2 / 6)
    assert result.results["base"]["judge"]["template"] == str(template)


def test_generate_text_and_label_metrics(tiny_model, qa_data, tmp_path, monkeypatch):
    answers = {"Capital of France?": "label: GEO.  paris", "2 + 2?": "Label: geo. 4", "Greet me.": "Hello!",
               "3 x 3?": "no idea"}
    fake = _fake_generator(lambda p: next(v for k, v in answers.items() if k in p))
    monkeypatch.setattr(ev, "generate_batch", fake)
    result = ev.run(_settings(tiny_model, qa_data, tmp_path / "o", generate=True, label_pattern=r"Label:\s*(\w+)"),
                    Reporter())
    gen = result.results["base"]["generation"]
    assert gen["exact_match"] == pytest.approx(2 / 4)  # case and whitespace normalised
    assert gen["label_accuracy"] == pytest.approx(1 / 3)  # the greeting has no reference label
    assert gen["labels"]["unparseable"] == 1
    assert gen["labels"]["unlabelled_references"] == 1
    assert gen["labels"]["confusion"]["math"] == {"math": 0, "geo": 1, "unparseable": 1}
    # the prompt is the user turn through the chat template, with the assistant header to continue from
    assert fake.calls[0][0] == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["label"] == "geo" and rows[0]["reference_label"] == "geo"


def test_real_generation_runs_greedy_and_repeatably(tiny_model, qa_data, tmp_path):
    kw = {"generate": True, "max_tokens": 4, "limit": 2, "seed": 3}
    first = ev.run(_settings(tiny_model, qa_data, tmp_path / "a", **kw), Reporter())
    second = ev.run(_settings(tiny_model, qa_data, tmp_path / "b", **kw), Reporter())
    rows_a = (tmp_path / "a" / "predictions.jsonl").read_text()
    assert rows_a == (tmp_path / "b" / "predictions.jsonl").read_text()
    assert first.examples == 2 and first.split_examples == 4
    assert first.results == second.results


def test_limit_and_seed_choose_repeatably():
    assert ev.choose(10, None, 0) == list(range(10))
    assert ev.choose(10, 20, 0) == list(range(10))
    picked = ev.choose(100, 5, 7)
    assert picked == ev.choose(100, 5, 7) == sorted(picked) and len(set(picked)) == 5
    assert picked != ev.choose(100, 5, 8)


def test_compare_base_with_adapter(tiny_model, judge_data, adapter_dir, tmp_path):
    plain = ev.run(_settings(tiny_model, judge_data, tmp_path / "plain"), Reporter())
    reporter = RecordingReporter()
    both = ev.run(EvalSettings(model=str(tiny_model), data=judge_data, adapter_path=adapter_dir, compare_base=True),
                  reporter)
    assert Path(both.out) == adapter_dir / "eval-test"  # the default --out
    base, tuned = both.results["base"]["loss"], both.results["adapter"]["loss"]
    # the base is the adapter's model with LoRA switched off: the same loss as the plain base model
    assert base["loss"] == pytest.approx(plain.results["base"]["loss"]["loss"], rel=1e-5)
    assert tuned["loss"] != pytest.approx(base["loss"], rel=1e-3)
    assert both.change["loss.loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert both.adapter["dir"] == str(adapter_dir) and len(both.adapter["sha256"]) == 64
    rows = [json.loads(x) for x in (adapter_dir / "eval-test" / "predictions.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 6 + ["adapter"] * 6
    # existing outputs are kept unless --overwrite
    with pytest.raises(UserError, match="--overwrite"):
        ev.run(EvalSettings(model=str(tiny_model), data=judge_data, adapter_path=adapter_dir), Reporter())
    only = ev.run(EvalSettings(model=str(tiny_model), data=judge_data, adapter_path=adapter_dir, overwrite=True),
                  Reporter())
    assert list(only.results) == ["adapter"]
    assert only.results["adapter"]["loss"]["loss"] == pytest.approx(tuned["loss"], rel=1e-5)


def test_adapter_for_another_base_is_refused(tiny_model, judge_data, adapter_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(adapter_dir, other, ignore=shutil.ignore_patterns("eval-*"))
    config = json.loads((other / "adapter_config.json").read_text())
    config["lorakit"]["base"]["hidden_size"] = 4096
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="hidden_size"):
        ev.run(EvalSettings(model=str(tiny_model), data=judge_data, adapter_path=other), Reporter())


def test_adapter_from_another_named_base_warns_once(tiny_model, judge_data, adapter_dir, tmp_path):
    import shutil

    other = tmp_path / "renamed"
    shutil.copytree(adapter_dir, other, ignore=shutil.ignore_patterns("eval-*"))
    config = json.loads((other / "adapter_config.json").read_text())
    config["model"] = "some-other-base"  # same shapes, another name: loaded with a warning
    (other / "adapter_config.json").write_text(json.dumps(config))
    reporter = RecordingReporter()
    ev.run(EvalSettings(model=str(tiny_model), data=judge_data, adapter_path=other, out=tmp_path / "o"), reporter)
    warnings = [m for kind, m in reporter.events if kind == "warn" and "some-other-base" in m]
    assert len(warnings) == 1, warnings


def test_bad_input(tiny_model, judge_data, qa_data, tmp_path):
    with pytest.raises(UserError, match="no valid.jsonl"):
        ev.run(_settings(tiny_model, judge_data, tmp_path / "o", split="valid"), Reporter())
    with pytest.raises(UserError, match="found no label in any reference"):
        ev.run(_settings(tiny_model, qa_data, tmp_path / "o", generate=True, label_pattern=r"Class=(\w+)"), Reporter())
    with pytest.raises(UserError, match="not a valid regular expression"):
        ev.run(_settings(tiny_model, qa_data, tmp_path / "o", generate=True, label_pattern="(unclosed"), Reporter())
    with pytest.raises(UserError, match=r"test.jsonl:1: --judge needs a non-empty string 'question'"):
        ev.run(_settings(tiny_model, qa_data, tmp_path / "o", judge=True), Reporter())
    with pytest.raises(UserError, match="--compare-base"):
        ev.run(_settings(tiny_model, qa_data, tmp_path / "o", compare_base=True), Reporter())
    with pytest.raises(UserError, match="--judge-template"):
        ev.run(_settings(tiny_model, judge_data, tmp_path / "o", judge=True, judge_template=str(tmp_path / "nope")),
               Reporter())
    with pytest.raises(UserError, match="--adapter-path .*not found"):
        ev.run(_settings(tiny_model, judge_data, tmp_path / "o", adapter_path=tmp_path / "none"), Reporter())
    text = _write(tmp_path / "text" / "test.jsonl", [{"text": "just text"}]).parent
    with pytest.raises(UserError, match="plain 'text' records have no reference"):
        ev.run(_settings(tiny_model, text, tmp_path / "o", generate=True), Reporter())
    assert not (tmp_path / "o").exists()  # nothing written on bad input


@pytest.mark.parametrize("body", ["{% include 'other.txt' %}", "{% for i in range(10**9) %}{{ i }}{% endfor %}"])
def test_a_judge_template_that_fails_while_rendering_exits_2(tiny_model, judge_data, tmp_path, body):
    template = tmp_path / "judge.jinja"
    template.write_text(body)
    with pytest.raises(UserError, match="--judge-template .*judge.jinja"):
        ev.run(_settings(tiny_model, judge_data, tmp_path / "o", judge=True, judge_template=str(template)),
               RecordingReporter())
