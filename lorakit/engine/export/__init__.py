"""Formats outside MLX: GGUF import and export, the GGUF tokenizer rebuild, the Hugging Face layout."""
