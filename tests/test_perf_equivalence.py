"""Speed must never change results: the optimised loss path matches the straightforward one on the tiny model.

Optimised: hidden states projected onto the vocabulary only at loss-bearing positions, in chunks, with the
cross-entropy gradient computed on the way (lorakit.engine.model.losses). Straightforward: full logits from
model(inputs), plain masked cross-entropy, autodiff.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

import lorakit.engine  # noqa: F401  (OpenBLAS before mlx)
from lorakit.engine import train as train_engine
from lorakit.engine.data.batching import BatchPlan, PairPlan
from lorakit.engine.data.tokenized import TokenizedExample
from lorakit.engine.model import losses
from lorakit.engine.reporter import Reporter
from lorakit.settings import TrainSettings


def _lora_model(tiny_model):
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_model)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 20.0, "dropout": 0.0})
    mx.random.seed(3)
    model.update(_randomised_lora_b(model))  # non-zero lora_b, so every LoRA weight gets a gradient
    model.train()
    return model


def _randomised_lora_b(model):
    from mlx.utils import tree_map_with_path

    return tree_map_with_path(
        lambda path, p: mx.random.normal(p.shape) * 0.05 if path.endswith("lora_b") else p,
        model.trainable_parameters())


def _examples(n, masked, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(60, 100))
        tokens = rng.integers(3, 380, size=length).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[length - int(rng.integers(5, 30)) if masked else 1:] = True  # masked: a short completion
        out.append(TokenizedExample(tokens, mask))
    return out


@pytest.mark.parametrize("masked", [True, False])
def test_chunked_loss_and_gradients_match_full_logits(tiny_model, monkeypatch, masked):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 384 * 50)  # several vocabulary-projection chunks
    model = _lora_model(tiny_model)
    head = losses.loss_head(model)
    assert head == "tied"
    plan = BatchPlan(_examples(6, masked), batch_size=6, max_seq_length=256, seed=0)
    for b in range(len(plan)):
        batch = plan.build(b)
        if masked:
            assert batch.positions is not None  # the gathered-positions path gets exercised
        arrays = batch.to_mx()
        (l_ref, n_ref), g_ref = nn.value_and_grad(model, losses.batch_loss)(model, arrays, None)
        (l_opt, n_opt), g_opt = nn.value_and_grad(model, losses.batch_loss)(model, arrays, head)
        assert n_opt.item() == n_ref.item() == batch.loss_tokens
        assert l_opt.item() == pytest.approx(l_ref.item(), rel=1e-5)
        for (name, a), (_, b_) in zip(tree_flatten(g_ref), tree_flatten(g_opt)):
            scale = mx.abs(a).max().item()
            assert scale > 0, name
            assert mx.abs(a - b_).max().item() <= 1e-4 * scale, name
        model.eval()  # evaluation (no gradient) takes the loss-only chunked path
        assert losses.batch_loss(model, arrays, head)[0].item() == pytest.approx(l_ref.item(), rel=1e-5)
        model.train()


def _chat_data(path, n=16):
    path.mkdir()
    rng = np.random.default_rng(1)
    words = ["reset", "password", "order", "ships", "France", "Paris", "answer", "verdict", "settings", "help"]
    with open(path / "train.jsonl", "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words, size=int(rng.integers(3, 15))))
            a = " ".join(rng.choice(words, size=int(rng.integers(3, 25))))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


class _Losses(Reporter):
    def __init__(self):
        self.losses = []

    def on_train_report(self, info):
        self.losses.append(info["train_loss"])


def _train(tiny_model, data, out, straightforward, monkeypatch, **extra):
    if straightforward:
        monkeypatch.setattr(train_engine, "loss_head", lambda model: None)
    reporter = _Losses()
    settings = TrainSettings(model=str(tiny_model), data=data, adapter_path=out, iters=8, batch_size=4,
                             learning_rate=2e-3, steps_per_report=1, steps_per_eval=1000, save_every=1000,
                             max_seq_length=128, lora_rank=4, lora_alpha=8, quiet=True, **extra)
    train_engine.run(settings, reporter)
    monkeypatch.undo()
    return reporter.losses


@pytest.mark.parametrize("masked", [True, False])
def test_a_short_last_batch_filled_with_empty_rows_gives_the_same_loss_and_gradients(tiny_model, masked):
    rng = np.random.default_rng(1)
    examples = [TokenizedExample(rng.integers(3, 380, 97).astype(np.int32), np.arange(97) >= (60 if masked else 1))
                for _ in range(11)]  # batches of 4, 4 and 3 rows, all 96 wide
    plain, filled = (BatchPlan(examples, 4, 256, seed=0, fill=fill) for fill in (False, True))
    assert plain.shapes() == {(4, 96), (3, 96)} and filled.shapes() == {(4, 96)}  # one compilation fewer
    model = _lora_model(tiny_model)
    head = losses.loss_head(model)
    short = next(b for b in range(len(plain)) if len(plain.batches[b]) == 3)
    results = []
    for plan in (plain, filled):
        batch = plan.build(short)
        assert batch.examples == 3 and batch.loss_tokens == plain.build(short).loss_tokens
        (loss, tokens), grads = nn.value_and_grad(model, losses.batch_loss)(model, batch.to_mx(), head)
        results.append((loss.item(), tokens.item(), tree_flatten(grads)))
    assert filled.build(short).inputs.shape == (4, 96)
    # and it takes the loss path its shape's other batches take (all positions, or as many gathered), so the
    # compiled step does not re-trace for it
    full = [filled.build(b).to_mx() for b in range(len(filled)) if b != short][0]
    gathered = filled.build(short).to_mx()
    assert (gathered["positions"] is None) == (full["positions"] is None) == (not masked)
    assert gathered["targets"].shape == full["targets"].shape
    (l_plain, n_plain, g_plain), (l_filled, n_filled, g_filled) = results
    assert n_filled == n_plain and l_filled == pytest.approx(l_plain, rel=1e-6)
    for (name, a), (_, b) in zip(g_plain, g_filled):
        assert mx.abs(a - b).max().item() <= 1e-5 * max(mx.abs(a).max().item(), 1e-12), name


def test_only_plans_for_the_compiled_step_fill_and_a_fill_at_most_doubles_a_batch():
    same = [TokenizedExample(np.full(70, 5, np.int32), np.ones(70, bool)) for _ in range(10)]  # rows 96 wide
    assert BatchPlan(same, 4, 256).shapes() == {(4, 96), (2, 96)}  # eval and validation: nothing to compile
    assert BatchPlan(same, 4, 256, fill=True).shapes() == {(4, 96)}
    assert BatchPlan(same[:9], 4, 256, fill=True).shapes() == {(4, 96), (1, 96)}  # 1 -> 4 rows: too many
    pairs = PairPlan(same, 2, 256, fill=True)  # 5 pairs: rows 4, 4 and 2 (a pair is two rows)
    assert pairs.shapes() == {(4, 96)} and pairs.build(len(pairs) - 1).inputs.shape == (4, 96)
    assert pairs.build(len(pairs) - 1).examples == 2


def test_training_with_short_batches_filled_matches_training_without(tiny_model, tmp_path, monkeypatch):
    _chat_data(tmp_path / "data", n=30)
    plans = []

    def train(out, fill):
        monkeypatch.setattr(train_engine, "filling_pays_off", lambda: fill)  # CUDA's choice, on this CPU
        planned = train_engine._plan
        monkeypatch.setattr(train_engine, "_plan", lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1])
        return _train(tiny_model, tmp_path / "data", out, False, monkeypatch, autofit=False)

    assert not train_engine.filling_pays_off()  # the CPU: a compile costs less than the empty rows
    plain, filled = train(tmp_path / "plain", False), train(tmp_path / "filled", True)
    assert not plans[0].filled and plans[1].filled and len(plans[1].shapes()) < len(plans[0].shapes())
    np.testing.assert_allclose(filled, plain, rtol=1e-5)


def test_training_loss_curve_matches_straightforward_path(tiny_model, tmp_path, monkeypatch):
    _chat_data(tmp_path / "data")
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 384 * 40)
    fast = _train(tiny_model, tmp_path / "data", tmp_path / "fast", False, monkeypatch)
    plain = _train(tiny_model, tmp_path / "data", tmp_path / "plain", True, monkeypatch)
    assert len(fast) == len(plain) == 8
    assert fast[-1] < fast[0]  # it does learn
    # Adam turns float rounding in near-zero gradients into small update differences: allow that noise
    np.testing.assert_allclose(fast, plain, rtol=1e-3)


def test_mixed_precision_lora_branch_matches_mlx_lm_layer():
    from mlx_lm.tuner.lora import LoRALinear

    mx.random.seed(0)
    x = mx.random.normal((4, 64))
    for dtype in (mx.float32, mx.bfloat16):
        base = nn.Linear(64, 32)
        base.set_dtype(dtype)
        layer = LoRALinear.from_base(base, r=8, scale=20.0)
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
        expected = layer(x.astype(dtype))
        train_engine.use_mixed_precision_lora(layer)
        assert type(layer) is not LoRALinear and layer.lora_a.dtype == mx.float32  # master weights stay fp32
        got = layer(x.astype(dtype))
        assert got.dtype == dtype
        if dtype == mx.float32:
            assert mx.array_equal(got, expected)  # float32 runs: bit for bit the same
        else:
            assert mx.allclose(got.astype(mx.float32), expected.astype(mx.float32), atol=0.05, rtol=0.02)


def test_trainable_head_gets_the_same_gradient(tiny_model, monkeypatch):
    """Full fine-tuning trains the (tied) head, so the chunks go through autodiff instead of the fused vjp."""
    from mlx_lm.utils import load_model

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 384 * 50)
    model, _ = load_model(tiny_model)
    model.unfreeze()
    model.train()
    arrays = BatchPlan(_examples(4, masked=True), batch_size=4, max_seq_length=256, seed=0).build(0).to_mx()
    (l_ref, _), g_ref = nn.value_and_grad(model, losses.batch_loss)(model, arrays, None)
    (l_opt, _), g_opt = nn.value_and_grad(model, losses.batch_loss)(model, arrays, "tied")
    assert l_opt.item() == pytest.approx(l_ref.item(), rel=1e-5)
    emb_ref, emb_opt = g_ref["model"]["embed_tokens"]["weight"], g_opt["model"]["embed_tokens"]["weight"]
    assert mx.abs(emb_ref - emb_opt).max().item() <= 1e-4 * mx.abs(emb_ref).max().item()


def test_one_exp_and_logsumexp_forms_agree():
    """The CPU form (one exp per logit) and the GPU form (fused logsumexp + exp) give the same losses and softmax."""
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 4, (37, 500)).astype(np.float32))
    targets = mx.array(rng.integers(0, 500, 37).astype(np.int32))
    weights = mx.array((rng.random(37) > 0.3).astype(np.float32))
    loss_a, probs_a = losses._losses_and_probs(logits, targets, weights, one_exp=True)
    loss_b, probs_b = losses._losses_and_probs(logits, targets, weights, one_exp=False)
    expected = nn.losses.cross_entropy(logits, targets) * weights
    assert mx.allclose(loss_a, expected, atol=1e-5).item() and mx.allclose(loss_b, expected, atol=1e-5).item()
    assert mx.allclose(probs_a, mx.softmax(logits, axis=-1), atol=1e-6).item()
    assert mx.allclose(probs_a, probs_b, atol=1e-6).item()


@pytest.mark.parametrize("recompute", ["blocks", "mlp", "mlp then blocks then none"])
def test_recomputing_in_backward_with_packing_gives_the_same_gradients(tiny_model, recompute):
    """Checkpointed blocks (or MLPs) recompute activations; the packed attention mask is not differentiated;
    switching recomputation off again restores the plain model."""
    from lorakit.engine.training.speedups import use_mlp_recompute

    examples = _examples(6, masked=True)
    arrays = BatchPlan(examples, batch_size=2, max_seq_length=256, pack=True, seed=0).build(0).to_mx()
    assert arrays["segments"] is not None and int(arrays["segments"].max().item()) >= 2  # really packed
    model = _lora_model(tiny_model)
    plain = [type(block) for block in model.layers] + [type(block.mlp) for block in model.layers]
    head = losses.loss_head(model)
    results = []
    for checkpoint in (False, True):
        if checkpoint and recompute == "blocks":
            train_engine.use_grad_checkpoint(model)  # same weights, blocks now recompute in the backward pass
        elif checkpoint and recompute == "mlp":
            use_mlp_recompute(model)
            assert all(type(block.mlp) is not cls for block, cls in zip(model.layers, plain[len(model.layers):]))
        elif checkpoint:
            use_mlp_recompute(model)
            train_engine.use_grad_checkpoint(model)
            use_mlp_recompute(model, False)
            train_engine.use_grad_checkpoint(model, False)
            assert [type(block) for block in model.layers] + [type(block.mlp) for block in model.layers] == plain
        (loss, _), grad = nn.value_and_grad(model, losses.batch_loss)(model, arrays, head)
        results.append((loss.item(), dict(tree_flatten(grad))))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grad_a.keys() == grad_b.keys()
    for key in grad_a:
        assert mx.allclose(grad_a[key], grad_b[key], atol=1e-6, rtol=1e-4).item(), key


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dequantized_matmul_is_as_exact_as_quantized_matmul(dtype):
    from lorakit.engine.model.qlora import DequantizedLinear, use_dequantized_matmuls

    mx.random.seed(0)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=True), group_size=32, bits=4)
    layer.set_dtype(dtype)
    x = mx.random.normal((3, 17, 256)).astype(dtype)
    # the exact answer: the same quantized weights, de-quantized and multiplied in float64-like float32
    w = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                      group_size=32, bits=4)
    exact_y = x.astype(mx.float32) @ w.T + layer.bias.astype(mx.float32)

    def output_and_input_grad():
        y = layer(x)
        return y, mx.grad(lambda x: (layer(x).astype(mx.float32) ** 2).sum())(x)

    ref_y, ref_grad = output_and_input_grad()
    assert use_dequantized_matmuls(layer) == 1 and isinstance(layer, DequantizedLinear)
    fast_y, fast_grad = output_and_input_grad()
    assert layer.weight.dtype == mx.uint32  # still 4-bit in memory

    def err(a, b):
        return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()

    if dtype == mx.float32:
        assert err(fast_y, ref_y) <= 1e-5 * mx.abs(ref_y).max().item()
        assert err(fast_grad, ref_grad) <= 1e-5 * mx.abs(ref_grad).max().item()
    else:  # within bf16 rounding: no further from the exact answer than MLX's quantized kernel (+1 ulp)
        ulp = 2.0 ** -7 * mx.abs(exact_y).max().item()
        assert err(fast_y, exact_y) <= err(ref_y, exact_y) + ulp
        assert err(fast_grad, ref_grad) <= 4 * ulp * mx.abs(ref_grad).max().item() / mx.abs(exact_y).max().item()


def test_qlora_fast_path_trains_like_mlx_quantized_matmul(tiny_model, tmp_path, monkeypatch):
    _chat_data(tmp_path / "data")
    q = {"quantize": 4, "q_group_size": 32}
    fast = _train(tiny_model, tmp_path / "data", tmp_path / "fast", False, monkeypatch, fast_qlora=True, **q)
    plain = _train(tiny_model, tmp_path / "data", tmp_path / "plain", False, monkeypatch, fast_qlora=False, **q)
    assert len(fast) == len(plain) == 8 and fast[-1] < fast[0]
    np.testing.assert_allclose(fast, plain, rtol=1e-3)


@pytest.mark.parametrize("mixed_precision", [False, True])  # True: lorakit's LoRA layers, whose down
@pytest.mark.parametrize("compiled", [False, True])  # projection can also recompute its input
def test_lean_swiglu_gives_the_same_loss_and_gradients(tiny_model, mixed_precision, compiled):
    from lorakit.engine.training.lean import use_lean_swiglu, use_swiglu_recompute
    from lorakit.engine.training.speedups import use_mixed_precision_lora

    model = _lora_model(tiny_model)
    if mixed_precision:
        use_mixed_precision_lora(model)
    arrays = BatchPlan(_examples(4, False), batch_size=4, max_seq_length=256, seed=0).build(0).to_mx()

    def loss_and_grads():
        step = nn.value_and_grad(model, losses.batch_loss)
        if not compiled:
            return step(model, arrays, None)
        state = [model.state]
        return mx.compile(lambda a: step(model, a, None), inputs=state, outputs=state)(arrays)

    (l_ref, _), g_ref = loss_and_grads()
    assert use_lean_swiglu(model, {"hidden_act": "silu"}) == len(model.layers)
    assert use_swiglu_recompute(model) == (len(model.layers) if mixed_precision else 0)
    (l_lean, _), g_lean = loss_and_grads()
    assert l_lean.item() == pytest.approx(l_ref.item(), rel=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(g_ref), tree_flatten(g_lean), strict=True):
        assert mx.abs(a - b).max().item() <= 1e-5 * mx.abs(a).max().item(), name
    assert use_lean_swiglu(_lora_model(tiny_model), {"hidden_act": "gelu"}) == 0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_unpacked_dequantize_gives_mlx_values(bits, dtype):
    from lorakit.engine.model.qlora import unpack_dequantize

    mx.random.seed(1)
    for group in (32, 64):
        w, scales, biases = mx.quantize(mx.random.normal((3, 40, 256)).astype(dtype), group, bits)
        expected = mx.dequantize(w, scales, biases, group_size=group, bits=bits)
        got = mx.compile(lambda *a, g=group: unpack_dequantize(*a, g, bits))(w, scales, biases)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        # the same values up to one rounding of the multiply-add (fused or not)
        ulp = {mx.float32: 2**-23, mx.float16: 2**-10, mx.bfloat16: 2**-7}[dtype]
        assert mx.abs(got - expected).max().item() <= ulp * mx.abs(expected).max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_head_is_dequantized_once_with_the_same_loss_and_gradients(tiny_model, monkeypatch, tied):
    from lorakit.engine.model import qlora

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 384 * 50)  # several vocabulary-projection chunks
    model = _lora_model(tiny_model)
    if not tied:  # an untied, quantized lm_head instead of the tied embedding
        model.lm_head = nn.Linear(model.model.embed_tokens.weight.shape[1], model.model.embed_tokens.weight.shape[0],
                                  bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight * 1.5
        model.args.tie_word_embeddings = False
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p in ("lm_head", "model.embed_tokens"))
    model.freeze(keys=["weight", "scales", "biases"], strict=False)
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    head = losses.loss_head(model)
    assert head == ("tied" if tied else "lm_head")
    arrays = BatchPlan(_examples(4, False), batch_size=4, max_seq_length=256, seed=0).build(0).to_mx()
    (l_ref, _), g_ref = nn.value_and_grad(model, losses.batch_loss)(model, arrays, head)
    calls = []
    matmul = qlora._dequantized_matmul
    monkeypatch.setattr(qlora, "_dequantized_matmul", lambda *a: calls.append(a) or matmul(*a))
    qlora.use_dequantized_matmuls(model)
    (l_fast, _), g_fast = nn.value_and_grad(model, losses.batch_loss)(model, arrays, head)
    assert not calls  # the head went through head_projection, not a de-quantizing matmul per chunk
    assert l_fast.item() == pytest.approx(l_ref.item(), rel=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(g_ref), tree_flatten(g_fast), strict=True):
        assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(a).max().item(), name


def test_the_cpu_fast_path_computes_in_float32_on_packed_weights():
    from lorakit.engine.model.qlora import use_dequantized_matmuls

    layer = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    layer.set_dtype(mx.float16)
    assert use_dequantized_matmuls(layer) == 1
    assert layer.weight.dtype == mx.uint32 and layer.scales.dtype == mx.float32
    assert layer(mx.ones((2, 64), mx.float32)).dtype == mx.float32


def _activation_bytes_per_block(tmp_path, mlp: str) -> float:
    """Peak of one compiled training step, per transformer block and token (8 minus 2 blocks).

    mlp: "mul" (gate * up: keeps exactly the two inputs), "lean" (lorakit's SwiGLU) or "product" (and the down
    projection recomputes its input)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from lorakit.engine.training.lean import use_lean_swiglu, use_swiglu_recompute
    from lorakit.engine.training.speedups import use_mixed_precision_lora
    from lorakit.testing import tiny_model_dir

    peaks = []
    for blocks in (2, 8):
        model, config = load_model(tiny_model_dir(tmp_path / f"m{blocks}", hidden_size=128, num_layers=blocks,
                                                  dtype="bfloat16"))
        model.freeze()
        linear_to_lora_layers(model, blocks, {"rank": 4, "scale": 20.0, "dropout": 0.0})
        use_mixed_precision_lora(model)
        if mlp == "mul":
            for layer in model.layers:
                layer.mlp.__class__ = type("MulMLP", (type(layer.mlp),), {
                    "__call__": lambda self, x: self.down_proj(self.gate_proj(x) * self.up_proj(x))})
        else:
            use_lean_swiglu(model, config)
            use_swiglu_recompute(model, mlp == "product")
        model.train()
        arrays = BatchPlan(_examples(8, False), batch_size=8, max_seq_length=256, seed=0).build(0).to_mx()
        state = [model.state]
        step = mx.compile(lambda a: nn.value_and_grad(model, losses.batch_loss)(model, a, None),
                          inputs=state, outputs=state)
        mx.eval(step(arrays))
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(arrays))
        peaks.append(mx.get_peak_memory() - before)
    return (peaks[1] - peaks[0]) / 6 / arrays["inputs"].size


def test_lean_swiglu_keeps_fewer_activations_when_compiled(tmp_path):
    # compilation must not merge the backward's recomputed sigmoid (or product) with the forward's, which keeps it
    intermediate = 2 * (2 * 128)  # bytes per token of a bf16 MLP activation (tiny models: 2 x hidden)
    mul = _activation_bytes_per_block(tmp_path / "mul", "mul")
    lean = _activation_bytes_per_block(tmp_path / "lean", "lean")
    product = _activation_bytes_per_block(tmp_path / "product", "product")
    # measured 0.42 and 0.84 intermediates; 1.17 and -0.33 with the sigmoid merged into the forward's
    assert lean <= mul + 0.75 * intermediate, (mul, lean)  # about what a plain product keeps
    assert lean - product >= 0.5 * intermediate, (lean, product)  # and less: not the product


def test_loss_chunks_run_one_after_another(monkeypatch):
    # MLX evaluates independent work breadth-first: unchained, the chunks' logits were alive side by side
    vocab, dim = 8192, 64
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 64 * vocab)  # 64 positions per chunk
    weight = mx.random.normal((vocab, dim), key=mx.random.key(0)) * 0.1

    def peak(n: int) -> int:
        keys = mx.random.split(mx.random.key(n), 2)
        hidden, targets = mx.random.normal((n, dim), key=keys[0]), mx.random.randint(0, vocab, (n,), key=keys[1])
        weights = mx.ones((n,))
        mx.eval(hidden, targets, weights)
        step = mx.compile(mx.value_and_grad(lambda h: losses.chunked_cross_entropy(
            lambda x: x @ weight.T, h, targets, weights, vocab, fused_grad=True)))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step(hidden))
        return mx.get_peak_memory() - before

    # 4 vs 32 chunks: measured 1.01x one after another; 1.81x side by side
    assert peak(2048) <= 1.4 * peak(256), (peak(256), peak(2048))
