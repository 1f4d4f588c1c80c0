"""lorakit: LoRA fine-tuning on Apple MLX."""

__version__ = "0.1.0"
