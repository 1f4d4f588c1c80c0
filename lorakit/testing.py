"""A tiny random llama model and a BPE tokenizer trained on the spot, saved as a normal model directory.

Used by the tests and benchmarks so every engine path runs offline in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password? Open Settings, choose Account, then Reset password.",
    "What is the capital of France? The capital of France is Paris.",
    "Answer A is better because it is correct and concise. Verdict: A",
    "Answer B is better because it cites the manual. Verdict: B",
    "Both answers are equally good. Verdict: tie",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "You are a helpful assistant. Please reply briefly and politely.",
    "Thank you for contacting support. Your order ships in 3-5 business days.",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


# model_type -> what its tiny config adds to the llama one (mlx-lm implements each; GGUF export covers each)
FAMILIES = {
    "llama": {},
    "mistral": {"architectures": ["MistralForCausalLM"]},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"]},  # q/k/v biases
    "qwen3": {"architectures": ["Qwen3ForCausalLM"]},  # q/k RMSNorms
    "gemma": {"architectures": ["GemmaForCausalLM"], "hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh",
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 2048,
             "pad_token_id": 0},  # fused qkv and gate_up projections
}


def _tiny_config(tok, hidden_size: int, num_layers: int, tie_word_embeddings: bool, dtype: str,
                 family: str) -> dict:
    """config.json of a tiny model of `family`: 4 heads (2 for keys and values), an MLP twice as wide."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": hidden_size * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_traditional": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "torch_dtype": dtype,
    }
    config.update(FAMILIES[family], model_type=family)
    if family == "gemma2":
        config["query_pre_attn_scalar"] = config["head_dim"]
    return config


def tiny_model_dir(path: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                   vocab_size: int = 384, tie_word_embeddings: bool = True, quantize_bits: int | None = None,
                   dtype: str = "float32", family: str = "llama", random_norms: bool = False) -> Path:
    """Write a tiny model directory of one of FAMILIES, loadable by mlx_lm.load (and lorakit's loader).
    `random_norms` draws the RMSNorm weights around 1 (else all 1), so a norm stored wrongly shows."""
    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported: keep above the mlx imports
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import _get_classes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    config = _tiny_config(tok, hidden_size, num_layers, tie_word_embeddings, dtype, family)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if random_norms:
        model.update(tree_map_with_path(
            lambda name, w: w + 0.2 * mx.random.normal(w.shape) if name.endswith("norm.weight") else w,
            model.parameters()))
    model.set_dtype(getattr(mx, dtype))
    if quantize_bits:
        nn.quantize(model, group_size=32, bits=quantize_bits)
        config["quantization"] = {"group_size": 32, "bits": quantize_bits}
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
        "add_bos_token": False,
    }, indent=2))
    return path


def random_adapter_dir(model_dir: str | Path, path: str | Path, *, fine_tune_type: str = "lora", rank: int = 4,
                       alpha: float = 8.0, num_layers: int = -1, target_modules: tuple[str, ...] = ("all-linear",),
                       seed: int = 0, b_scale: float = 0.5) -> Path:
    """An adapter for the model at `model_dir` in mlx-lm's layout, as `lorakit train` saves it, with random
    non-zero B (and DoRA magnitudes) so that it visibly changes the model's logits."""
    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported: keep above the mlx imports
    import mlx.core as mx

    from lorakit.engine.model.adapters import adapter_config, apply_adapters, save_adapter
    from lorakit.engine.model.loading import load_model
    from lorakit.settings import TrainSettings

    settings = TrainSettings(model=str(model_dir), data=Path("."), fine_tune_type=fine_tune_type, lora_rank=rank,
                             lora_alpha=alpha, num_layers=num_layers, target_modules=list(target_modules))
    loaded = load_model(settings)
    mx.random.seed(seed)  # before the adapters: their A matrices are drawn too (same adapter in any test order)
    lora_parameters = apply_adapters(loaded.model, settings)
    for _, module in loaded.model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = b_scale * mx.random.normal(module.lora_b.shape)
        if hasattr(module, "m"):
            module.m = module.m * (1.0 + 0.2 * mx.random.normal(module.m.shape))
    save_adapter(loaded.model, Path(path), adapter_config(settings, loaded, lora_parameters))
    return Path(path)


def gguf_layout_model_dir(model_dir: str | Path, path: str | Path) -> Path:
    """A copy of a llama model directory as lorakit's GGUF import leaves one: q/k rows in llama.cpp's order,
    `rope_traditional: true` and a `lorakit_source` saying gguf. It computes the same function."""
    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported: keep above the mlx imports
    import mlx.core as mx

    from lorakit.engine.export.hf_export import permute_rows, qk_heads

    model_dir, path = Path(model_dir), Path(path)
    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    weights = {k: permute_rows(v, qk_heads(k, config)) if qk_heads(k, config) else v for k, v in weights.items()}
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config.update(rope_traditional=True, lorakit_source={"format": "gguf", "file": "stand-in.gguf", "sha256": "0"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((model_dir / name).read_bytes())
    return path
