"""Loss masks per template, data formats, truncation, the tokenisation cache, and batches (no padding trained)."""

import json

import numpy as np
import pytest

from lorakit.engine.data.batching import BatchPlan, bucket
from lorakit.engine.data.templates import BUILTIN_TEMPLATES
from lorakit.engine.data.tokenized import TokenizedExample, load_split
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye"},
]

# Hand-computed: the text of every assistant turn plus its end-of-turn token, nothing else.
EXPECTED = {
    "chatml": ["Hello there<|im_end|>", "Goodbye<|im_end|>"],
    "qwen2.5": ["Hello there<|im_end|>", "Goodbye<|im_end|>"],
    "llama3": ["Hello there<|eot_id|>", "Goodbye<|eot_id|>"],
    # Mistral's assistant turn is ' ' + content + eos; the space is merged into the first word's token.
    # It also moves the system prompt to the last user turn, so the first turn is found by search.
    "mistral": [" Hello there</s>", " Goodbye</s>"],
    "gemma": ["Hello there<end_of_turn>", "Goodbye<end_of_turn>"],
    # Phi-3 ends the whole conversation with eos after the last <|end|>.
    "phi3": ["Hello there<|end|>", "Goodbye<|end|>\n<|endoftext|>"],
    "alpaca": ["Hello there</s>", "Goodbye</s>"],
}
SPECIAL = {
    "chatml": ({}, ["<|im_start|>", "<|im_end|>"]),
    "qwen2.5": ({}, ["<|im_start|>", "<|im_end|>"]),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": ({"bos_token": "<s>", "eos_token": "</s>"}, []),
    "gemma": ({"bos_token": "<bos>", "eos_token": "<eos>"}, ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ({"bos_token": "<s>", "eos_token": "<|endoftext|>"},
             ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "alpaca": ({"bos_token": "<s>", "eos_token": "</s>"}, []),
}


def _tokenizer(model_dir, template="chatml"):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    hf = tok._tokenizer
    named, extra = SPECIAL[template]
    hf.add_special_tokens({**named, "additional_special_tokens": extra})
    hf.chat_template = BUILTIN_TEMPLATES[template]
    return tok


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _runs(tok, ex):
    """Decoded text of each contiguous run of loss-bearing tokens."""
    runs, current = [], []
    for token, m in zip(ex.tokens.tolist(), ex.mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok._tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_assistant_mask_per_template(tiny_model, tmp_path, template):
    tok = _tokenizer(tiny_model, template)
    data = _write(tmp_path / "d", [{"messages": CHAT}])
    split = load_split(data, "train", tok, "assistant", 4096, cache_dir=tmp_path / "cache")
    ex = split.examples[0]
    assert ex.tokens.tolist() == list(tok.apply_chat_template(CHAT))
    assert _runs(tok, ex) == EXPECTED[template]


def test_completions_and_all_on_chat(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    data = _write(tmp_path / "d", [{"messages": CHAT}])
    last = load_split(data, "train", tok, "completions", 4096, cache_dir=tmp_path / "c").examples[0]
    assert _runs(tok, last) == ["Goodbye<|im_end|>"]
    everything = load_split(data, "train", tok, "all", 4096, cache_dir=tmp_path / "c").examples[0]
    assert everything.mask[1:].all() and not everything.mask[0]


def test_prompt_completion_and_text_formats(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    data = _write(tmp_path / "pc", [{"prompt": "What is 2+2?", "completion": "4"}])
    split = load_split(data, "train", tok, "auto", 4096, cache_dir=tmp_path / "c")
    assert split.format == "completions" and split.train_on == "completions"
    assert _runs(tok, split.examples[0]) == ["4<|im_end|>"]

    text = _write(tmp_path / "t", [{"text": "The quick brown fox"}])
    split = load_split(text, "train", tok, "auto", 4096, cache_dir=tmp_path / "c")
    ex = split.examples[0]
    assert split.train_on == "all" and ex.tokens[-1] == tok.eos_token_id and ex.mask[1:].all()
    with pytest.raises(UserError, match="--train-on assistant"):
        load_split(text, "train", tok, "assistant", 4096, cache_dir=tmp_path / "c")


def test_truncation_counted_and_empty_examples_dropped(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    long_prompt = {"prompt": "word " * 200, "completion": "done"}
    rows = [{"prompt": "Hi", "completion": "Hello there, how are you today? " * 5}, long_prompt]
    data = _write(tmp_path / "d", rows)
    rec = RecordingReporter()
    split = load_split(data, "train", tok, "auto", 40, rec, cache_dir=tmp_path / "c")
    assert split.truncated == 2 and split.dropped == 1 and len(split.examples) == 1
    assert all(e.length <= 40 for e in split.examples)
    warnings = " ".join(m for kind, m in rec.events if kind == "warn")
    assert "2 of 2 examples are longer than --max-seq-length 40" in warnings and "1 examples have no" in warnings


def test_cache_is_reused_and_keyed(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    data = _write(tmp_path / "d", [{"messages": CHAT}])
    first = load_split(data, "train", tok, "assistant", 4096, cache_dir=tmp_path / "c")
    files = list((tmp_path / "c" / "tokenized").iterdir())
    assert len(files) == 1
    again = load_split(data, "train", tok, "assistant", 4096, cache_dir=tmp_path / "c")
    assert np.array_equal(first.examples[0].tokens, again.examples[0].tokens)
    assert np.array_equal(first.examples[0].mask, again.examples[0].mask)
    load_split(data, "train", tok, "all", 4096, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c" / "tokenized").iterdir())) == 2


def test_cache_honours_tilde_in_lorakit_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAKIT_CACHE", "~/lk-cache")
    monkeypatch.chdir(tmp_path)
    data = _write(tmp_path / "d", [{"messages": CHAT}])
    load_split(data, "train", _tokenizer(tiny_model), "assistant", 4096)
    assert len(list((tmp_path / "home" / "lk-cache" / "tokenized").iterdir())) == 1
    assert not (tmp_path / "~").exists()


def test_bad_records_name_file_and_line(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    data = _write(tmp_path / "d", [{"messages": CHAT}, {"question": "x"}])
    with pytest.raises(UserError, match=r"train.jsonl:2: expected a 'messages'"):
        load_split(data, "train", tok, "auto", 4096, cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="no valid.jsonl"):
        load_split(data, "valid", tok, "auto", 4096, cache_dir=tmp_path / "c")


def test_batches_sorted_shuffled_and_never_train_padding(tiny_model, tmp_path):
    tok = _tokenizer(tiny_model)
    rows = [{"messages": [{"role": "user", "content": "Hi " * (i + 1)},
                          {"role": "assistant", "content": "Hello " * (3 * i + 1)}]} for i in range(10)]
    split = load_split(_write(tmp_path / "d", rows), "train", tok, "all", 4096, cache_dir=tmp_path / "c")
    plan = BatchPlan(split.examples, 3, 4096, seed=1)
    assert [len(b) for b in plan.batches] == [3, 3, 3, 1]
    lengths = [[split.examples[row[0]].length for row in b] for b in plan.batches]
    assert lengths == sorted(lengths) and all(x == sorted(x) for x in lengths)  # really sorted
    assert plan.order(0) == BatchPlan(split.examples, 3, 4096, seed=1).order(0)  # deterministic
    assert sorted(plan.order(0)) == list(range(4)) and plan.order(0) != plan.order(1)
    for b in range(len(plan)):
        batch = plan.build(b)
        assert batch.inputs.shape[1] % 32 == 0
        for r, row in enumerate(plan.batches[b]):
            n = split.examples[row[0]].length
            assert batch.weights[r, n - 1:].sum() == 0  # padding targets carry no loss
            assert batch.weights[r, : n - 1].sum() == split.examples[row[0]].mask.sum()
    assert bucket(20) == 32 and bucket(33) == 64 and bucket(300) == 320 and bucket(1000) == 1024
    # from 512 up, multiples of 128 (MLX's fused CUDA attention has a backward pass only for those)
    assert all(bucket(n) % 128 == 0 and bucket(n) >= n for n in range(513, 5000, 7))


def test_packed_rows_fill_max_seq_length_inputs():
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(rng.integers(3, 300, n).astype(np.int32), np.ones(n, bool))
                for n in rng.integers(50, 700, 40)]
    plan = BatchPlan(examples, 2, 1024, pack=True, seed=0)
    widths = set()
    for b in range(len(plan)):
        batch = plan.build(b)
        widths.add(batch.inputs.shape[1])
        assert batch.inputs.shape[1] <= 1024  # inputs never exceed max_seq_length
        for r, row in enumerate(plan.batches[b]):
            assert sum(examples[i].length for i in row) <= 1025  # a row: max_seq_length + 1 tokens
            tokens = sum(examples[i].length for i in row)
            assert (batch.segments[r] > 0).sum() == min(tokens, batch.inputs.shape[1])
    assert 1024 in widths  # full rows use every position: a multiple of 128 for the fused attention
