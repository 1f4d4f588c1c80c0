"""Preference training (DPO, ORPO): losses against a straightforward implementation, reward accuracy, the
reference model, exact resume, prepare's checks of preference records, and eval's preference metrics."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten, tree_map_with_path
from typer.testing import CliRunner

import lorakit.engine  # noqa: F401  (OpenBLAS before mlx)
from lorakit.cli.app import app
from lorakit.engine import eval as eval_engine
from lorakit.engine import train
from lorakit.engine.data.batching import PairPlan
from lorakit.engine.data.tokenized import TokenizedExample
from lorakit.engine.model.generation import base_model
from lorakit.engine.model.losses import loss_head
from lorakit.engine.model.preference import dpo_loss, orpo_loss
from lorakit.engine.reporter import RecordingReporter, Reporter
from lorakit.engine.scoring.preference import preference_metrics
from lorakit.engine.training.objective import DPO, ORPO, reference_logps
from lorakit.errors import UserError
from lorakit.settings import EvalSettings, TrainSettings

runner = CliRunner()


def _lora_model(model_dir):
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.random.seed(5)
    # non-zero lora_b: the adapted model differs from its base, and every LoRA weight gets a gradient
    model.update(tree_map_with_path(lambda path, p: mx.random.normal(p.shape) * 0.05
                                    if path.endswith("lora_b") else p, model.trainable_parameters()))
    model.eval()
    return model


def _pairs(n=3, seed=0):
    """Hand-made (chosen, rejected) examples of varied lengths; the last tokens of each are the reply."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(2 * n):
        length, reply = 12 + 5 * i, 4 + (i % 3) * 3
        mask = np.zeros(length, bool)
        mask[length - reply:] = True
        examples.append(TokenizedExample(rng.integers(3, 380, length).astype(np.int32), mask))
    return examples


def _straight_logps(model, examples):
    """Each example's summed log-probability of its masked tokens: full logits, log-softmax, one at a time."""
    out = []
    for ex in examples:
        logits = model(mx.array(ex.tokens)[None, :-1])[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(ex.tokens[1:])[:, None], axis=-1)[:, 0]
        out.append((picked * mx.array(ex.mask[1:].astype(np.float32))).sum())
    return out


def _straight_dpo(model, examples, reference, beta):
    lp = _straight_logps(model, examples)
    total = mx.array(0.0)
    for i in range(0, len(examples), 2):
        z = beta * ((lp[i] - reference[i]) - (lp[i + 1] - reference[i + 1]))
        total = total + mx.log(1 + mx.exp(-z))
    return total


def _straight_orpo(model, examples, beta):
    lp = _straight_logps(model, examples)
    total = mx.array(0.0)
    for i in range(0, len(examples), 2):
        mc, mr = lp[i] / examples[i].mask[1:].sum(), lp[i + 1] / examples[i + 1].mask[1:].sum()
        log_odds = (mc - mx.log(1 - mx.exp(mc))) - (mr - mx.log(1 - mx.exp(mr)))
        total = total - mc - beta * mx.log(1 / (1 + mx.exp(-log_odds)))
    return total


def _assert_same_grads(g_ref, g_got):
    ref, got = dict(tree_flatten(g_ref)), dict(tree_flatten(g_got))
    assert set(ref) == set(got) and ref
    for key in ref:
        scale = mx.abs(ref[key]).max().item()
        assert scale > 0 and mx.abs(ref[key] - got[key]).max().item() <= 1e-4 * scale, key


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("use_head", [False, True])
def test_dpo_loss_and_gradients_match_a_straightforward_implementation(tiny_model, use_head, pack):
    model = _lora_model(tiny_model)
    examples = _pairs()
    reference = np.array([float(v) - 0.3 * (i % 3) for i, v in enumerate(_straight_logps(model, examples))],
                         np.float32)
    head = loss_head(model) if use_head else None
    assert not use_head or head is not None
    batch = PairPlan(examples, 3, 256, reference=reference, pack=pack).build(0).to_mx()
    assert batch["inputs"].shape[0] == (1 if pack else 6)  # packed: all six replies in one row
    objective = DPO(head, beta=0.5, variant="sigmoid")

    (loss, pairs, stats), grad = nn.value_and_grad(model, objective.loss)(model, batch)
    ref_loss, ref_grad = nn.value_and_grad(model, lambda m: _straight_dpo(m, examples, reference, 0.5))(model)
    assert pairs.item() == 3
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    _assert_same_grads(ref_grad, grad)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("use_head", [False, True])
def test_orpo_loss_and_gradients_match_a_straightforward_implementation(tiny_model, use_head, pack):
    model = _lora_model(tiny_model)
    examples = _pairs(seed=1)
    batch = PairPlan(examples, 3, 256, pack=pack).build(0).to_mx()
    assert (batch["segments"] is not None) == pack
    objective = ORPO(loss_head(model) if use_head else None, beta=0.2)

    (loss, pairs, _), grad = nn.value_and_grad(model, objective.loss)(model, batch)
    ref_loss, ref_grad = nn.value_and_grad(model, lambda m: _straight_orpo(m, examples, 0.2))(model)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    _assert_same_grads(ref_grad, grad)


def test_dpo_variants_on_hand_made_log_probs():
    # pairs (chosen, rejected): policy log-probs, reference log-probs, reply lengths
    logps = mx.array([-1.0, -3.0, -5.0, -2.0, -4.0, -4.5])
    reference = mx.array([-2.0, -2.0, -2.0, -2.0, -4.0, -4.0])
    counts = mx.array([2.0, 2.0, 5.0, 1.0, 4.0, 4.0])
    # log ratios: pair 1 chosen +1, rejected -1; pair 2 chosen -3, rejected 0; pair 3 chosen 0, rejected -0.5
    diffs = np.array([2.0, -3.0, 0.5])
    loss, pairs, stats = dpo_loss(logps, counts, reference, beta=0.1)
    assert pairs.item() == 3
    assert loss.item() == pytest.approx(float(np.sum(np.log1p(np.exp(-0.1 * diffs)))), rel=1e-6)
    acc, margin, chosen, rejected, chosen_logp, rejected_logp = np.array(stats)
    assert acc == 2  # pairs 1 and 3 rank the chosen reply higher
    assert margin == pytest.approx(0.1 * diffs.sum(), rel=1e-6)
    assert chosen == pytest.approx(0.1 * (1 - 3 + 0)) and rejected == pytest.approx(0.1 * (-1 + 0 - 0.5))
    assert chosen_logp == pytest.approx(-10.0) and rejected_logp == pytest.approx(-9.5)

    hinge, _, _ = dpo_loss(logps, counts, reference, beta=0.1, variant="hinge")
    assert hinge.item() == pytest.approx(float(np.maximum(0, 1 - 0.1 * diffs).sum()), rel=1e-6)
    ipo, _, _ = dpo_loss(logps, counts, reference, beta=0.1, variant="ipo")
    mean_diffs = np.array([(0.5 - 0) - (-1 / 2 - 0), (-1 + 0.4) - (-2 + 2), (-1 + 1) - (-4.5 / 4 + 1)])
    assert ipo.item() == pytest.approx(float(((mean_diffs - 5.0) ** 2).sum()), rel=1e-5)

    # ORPO's rewards are beta * per-token mean log-probs: -0.5 vs -1.5, -1 vs -2, -1 vs -1.125: all correct
    _, _, orpo_stats = orpo_loss(logps, counts, beta=0.1)
    acc, margin = np.array(orpo_stats)[:2]
    assert acc == 3 and margin == pytest.approx(0.1 * (1 + 1 + 0.125), rel=1e-5)


def test_preference_metrics_on_hand_made_pairs():
    logps = np.array([-10.0, -12.0, -30.0, -20.0, -8.0, -9.0, -15.0, -14.0])
    counts = np.array([10.0, 4.0, 30.0, 10.0, 8.0, 9.0, 30.0, 7.0])
    got = preference_metrics(logps, counts)
    assert got["pairs"] == 4 and got["accuracy"] == 0.5  # pairs 1 and 3
    assert got["mean_accuracy"] == 0.75  # per token: -1 > -3, -1 < -2, -1 = -1 (not >), -0.5 > -2
    assert got["margin"] == pytest.approx((2 - 10 + 1 - 1) / 4)
    reference = np.array([-11.0, -11.0, -35.0, -20.0, -8.0, -9.0, -16.0, -12.0])
    got = preference_metrics(logps, counts, reference)
    # rewards (chosen - rejected): 1 - (-1) = 2; 5 - 0 = 5; 0 - 0 = 0; 1 - (-2) = 3
    assert got["reward_accuracy"] == 0.75 and got["reward_margin"] == pytest.approx(10 / 4)


def test_adapter_off_reference_equals_a_separately_loaded_base(tiny_model):
    from mlx_lm.utils import load_model

    examples = _pairs(seed=2)
    adapted = _lora_model(tiny_model)
    base, _ = load_model(tiny_model)
    with base_model(adapted) as switched:
        off = reference_logps(adapted, examples, None, 2, 256, Reporter(), "test")
    assert switched > 0
    separate = reference_logps(base, examples, None, 2, 256, Reporter(), "test")
    on = reference_logps(adapted, examples, None, 2, 256, Reporter(), "test")
    np.testing.assert_array_equal(off, separate)
    assert np.abs(on - separate).max() > 1e-3  # the adapter does change them
    straight = np.array([float(v) for v in _straight_logps(base, examples)])
    np.testing.assert_allclose(separate, straight, rtol=1e-5)


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


PAIRS = [{"prompt": f"How do I fix problem {i}?", "chosen": f"Restart the device, then open Settings {i}.",
          "rejected": "No idea."} for i in range(8)]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    _write_pairs(path / "train.jsonl", PAIRS)
    _write_pairs(path / "valid.jsonl", PAIRS[:4])
    return path


def _settings(model, data, out, **kw):
    base = {"model": str(model), "data": data, "adapter_path": out, "batch_size": 2, "iters": 6,
            "learning_rate": 1e-3, "lora_dropout": 0.1, "steps_per_report": 1, "steps_per_eval": 3,
            "save_every": 1, "keep_last": 2, "quiet": True}
    return TrainSettings(**{**base, **kw})


def test_dpo_resume_is_bitwise_exact_and_logs_preference_metrics(tiny_model, pair_data, tmp_path):
    straight = tmp_path / "straight"
    rec = RecordingReporter()
    result = train.run(_settings(tiny_model, pair_data, straight), rec)
    assert result.steps == 6 and result.best_step is not None
    assert any("training with --objective dpo" in m for kind, m in rec.events if kind == "log")
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_logp"} <= set(train_rows[0])
    assert val_rows[0]["val_loss"] == pytest.approx(np.log(2), rel=1e-5)  # policy = reference at step 0
    assert val_rows[0]["val_reward_accuracy"] == 0
    assert val_rows[-1]["val_reward_accuracy"] > 0.5 and val_rows[-1]["val_loss"] < np.log(2)

    resumed = tmp_path / "resumed"
    train.run(_settings(tiny_model, pair_data, resumed, iters=3), RecordingReporter())
    train.run(_settings(tiny_model, pair_data, resumed, resume=True), RecordingReporter())
    a, b = mx.load(str(straight / "adapters.safetensors")), mx.load(str(resumed / "adapters.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert mx.array_equal(a[key], b[key]).item(), key


def test_orpo_trains_and_objective_mismatches_are_user_errors(tiny_model, pair_data, tmp_path):
    result = train.run(_settings(tiny_model, pair_data, tmp_path / "orpo", objective="orpo", iters=2,
                                 lora_dropout=0.0), RecordingReporter())
    assert result.final_val_loss is not None
    with pytest.raises(UserError, match="--objective sft: .* preference pairs"):
        train.run(_settings(tiny_model, pair_data, tmp_path / "sft", objective="sft"), Reporter())
    packed = train.run(_settings(tiny_model, pair_data, tmp_path / "pack", pack=True, iters=2), Reporter())
    assert packed.final_val_loss is not None and packed.layout.startswith("--pack")  # pairs pack too
    replies = sum(1 for line in (pair_data / "train.jsonl").read_text().splitlines() if line.strip())
    assert packed.trained_tokens > 2 * replies  # reply tokens of both replies, not pairs
    chat = tmp_path / "chat"
    chat.mkdir()
    _write_pairs(chat / "train.jsonl", [{"prompt": "hi", "completion": "hello"}])
    with pytest.raises(UserError, match="--objective dpo: .* not preference pairs"):
        train.run(_settings(tiny_model, chat, tmp_path / "dpo", objective="dpo"), Reporter())
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_eval_reports_preference_accuracy_for_base_and_adapter(tiny_model, pair_data, tmp_path):
    run = tmp_path / "run"
    train.run(_settings(tiny_model, pair_data, run, lora_dropout=0.0), RecordingReporter())
    result = eval_engine.run(EvalSettings(model=str(tiny_model), data=pair_data, split="valid", adapter_path=run,
                                          compare_base=True, out=tmp_path / "ev", quiet=True), Reporter())
    base, tuned = result.results["base"]["preference"], result.results["adapter"]["preference"]
    assert base["pairs"] == tuned["pairs"] == 4
    assert "reward_accuracy" not in base and tuned["reward_accuracy"] == 1.0
    assert tuned["margin"] > base["margin"]
    assert result.change["preference.margin"] == pytest.approx(tuned["margin"] - base["margin"])
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert {"chosen_logp", "rejected_logp", "correct"} <= set(rows[0])


def test_prepare_names_file_and_line_of_bad_pairs(tmp_path):
    src = tmp_path / "pairs.jsonl"
    _write_pairs(src, [PAIRS[0], {"prompt": "Same?", "chosen": "yes  it is", "rejected": "yes it is"},
                       {"chosen": "a", "rejected": "b"}, {"prompt": "x", "chosen": "  ", "rejected": "b"},
                       {"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}])
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{src}:2: 'chosen' and 'rejected' are the same reply" in result.stderr
    assert f"{src}:3: missing field 'prompt'" in result.stderr
    assert f"{src}:4: 'chosen' is empty" in result.stderr
    assert f"{src}:5: 'chosen' must be a string or a list of messages ending with an assistant one" in result.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_writes_pairs_with_length_statistics(tiny_model, tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [*PAIRS, {"prompt": "Long one?", "chosen": "Short.", "rejected": " ".join(f"x{i * 7919 % 1000}" for i in range(300))},
            {"question": "q", "prompt": "mapped?", "good": "A helpful reply.", "bad": "No."}]
    _write_pairs(src, rows)
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer",
                                 str(tiny_model), "--max-tokens", "120", "--field-map", "chosen=good",
                                 "--field-map", "rejected=bad", "--on-error", "skip", "--max-error-rate", "0.5",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"][:9]) for r in rejected] == [(9, "too long:")]  # its rejected reply is
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    pref = manifest["preference"]
    assert pref["chosen_chars"]["max"] > pref["rejected_chars"]["max"] and pref["chosen_longer"] == 1.0
    assert pref["rejected_tokens"]["min"] > 0 and pref["chosen_tokens"]["min"] > 0
    written = [json.loads(line) for name in ("train", "valid", "test")
               for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    assert len(written) == 9
    assert all(r["chosen"][0]["role"] == "assistant" and r["rejected"][0]["role"] == "assistant" for r in written)
    assert any(r["chosen"][0]["content"] == "A helpful reply." for r in written)


@pytest.mark.parametrize("base,fine_tune_type", [("tiny_model", "dora"), ("tiny_model_q4", "lora")])
def test_dpo_on_dora_and_qlora_starts_at_its_reference(base, fine_tune_type, pair_data, tmp_path, request):
    # at step 0 the adapted model computes what the reference did, whatever the adapter kind or base
    model = request.getfixturevalue(base)
    out = tmp_path / "run"
    train.run(_settings(model, pair_data, out, fine_tune_type=fine_tune_type, iters=2, lora_dropout=0.0),
              RecordingReporter())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "val_loss" in r)
    assert first["iteration"] == 0 and first["val_loss"] == pytest.approx(np.log(2), abs=1e-3)
    assert abs(first["val_reward_margin"]) < 1e-2
    assert rows[-1]["val_loss"] < first["val_loss"]


def test_cli_refuses_mismatched_objective_and_text_output_with_exit_2(tiny_model, pair_data, tmp_path):
    result = runner.invoke(app, ["train", "-m", str(tiny_model), "--data", str(pair_data), "--adapter-path",
                                 str(tmp_path / "run"), "--objective", "sft", "--iters", "1"])
    assert result.exit_code == 2 and "--objective sft" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["prepare", str(pair_data / "train.jsonl"), "--out", str(tmp_path / "text"),
                                 "--format", "text", "--template", "chatml"])
    assert result.exit_code == 2 and "cannot be rendered as one text" in result.stderr
    result = runner.invoke(app, ["train", "-m", str(tiny_model), "--data", str(pair_data), "--adapter-path",
                                 str(tmp_path / "run"), "--beta", "0"])
    assert result.exit_code == 2 and "--beta" in result.stderr


def test_dpo_on_two_ranks_trains_the_same_adapter_as_one_process(tiny_model, tmp_path):
    from test_distributed import _json_lines, _launch_ring, _weights

    data = tmp_path / "pairs"
    data.mkdir()
    rows = [{"prompt": f"Question {i}?", "chosen": f"A helpful answer number {i}, with detail.",
             "rejected": f"No {i}."} for i in range(16)]
    _write_pairs(data / "train.jsonl", rows)
    _write_pairs(data / "valid.jsonl", rows[:4])
    args = ["--iters", "4", "--batch-size", "4", "--learning-rate", "1e-3", "--steps-per-report", "2",
            "--steps-per-eval", "2", "--val-batches", "-1", "--json"]

    def command(out):
        return ["train", "--model", str(tiny_model), "--data", str(data), "--adapter-path", str(out), *args]

    single = runner.invoke(app, command(tmp_path / "single"))
    assert single.exit_code == 0, single.stderr
    ranks = _launch_ring(command(tmp_path / "double"))
    assert ranks.returncode == 0, ranks.stderr
    assert len(_json_lines(ranks.stdout)) == 1
    one, two = _weights(tmp_path / "single"), _weights(tmp_path / "double")
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-3, atol=5e-5, err_msg=key)

    def last_val(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if "val_loss" in line][-1]

    a, b = last_val(tmp_path / "single"), last_val(tmp_path / "double")
    assert b["val_reward_accuracy"] == a["val_reward_accuracy"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3, abs=1e-4)
    assert b["val_chosen_logp"] == pytest.approx(a["val_chosen_logp"], rel=1e-3)


def test_generate_scores_a_pair_against_its_chosen_reply():
    chat = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}]}
    assert eval_engine.generation_parts(chat, "f:1") == ([{"role": "user", "content": "Hi?"}], "Hello.")
    assert eval_engine.generation_parts({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}, "f:2") == \
        ("Hi?", "Hello.")
    with pytest.raises(UserError, match="f:3: --generate needs the pair's 'prompt'"):
        eval_engine.generation_parts({"chosen": "Hello.", "rejected": "No."}, "f:3")


def test_raw_mlx_lm_lora_pairs_tokenise_with_system_prompt_and_reply_only_masks(tiny_model, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from lorakit.engine.data.tokenized import load_split

    _write_pairs(tmp_path / "train.jsonl", [{"system": "Be brief.", "prompt": "Hi?", "chosen": "Hello there.",
                                             "rejected": "Go away."}])
    tokenizer = load_tokenizer(tiny_model)
    split = load_split(tmp_path, "train", tokenizer, "auto", 512)
    assert split.format == "preference" and split.records == 1 and len(split.examples) == 2
    chosen, rejected = split.examples
    assert tokenizer.decode(chosen.tokens.tolist()).startswith("<|im_start|>system\nBe brief.")
    assert tokenizer.decode(chosen.tokens[chosen.mask].tolist()).startswith("Hello there.")
    assert tokenizer.decode(rejected.tokens[rejected.mask].tolist()).startswith("Go away.")
    for ex in split.examples:  # one contiguous span: the reply and its end-of-turn token, nothing of the prompt
        assert (np.diff(np.flatnonzero(ex.mask)) == 1).all()
        assert tokenizer.decode(ex.tokens[ex.mask].tolist()).endswith("<|im_end|>")
