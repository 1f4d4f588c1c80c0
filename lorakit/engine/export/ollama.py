"""An Ollama `Modelfile` beside an exported GGUF: `ollama create NAME -f Modelfile` then runs it.

FROM names the GGUF (or, for an adapter-only GGUF, the base it was trained on) and ADAPTER the adapter.
TEMPLATE is written for the chat formats whose Go-template spelling is known (ChatML, Llama 3, Gemma,
Phi-3); for any other chat template Ollama falls back to the `tokenizer.chat_template` stored in the GGUF.
PARAMETER stop lists the end-of-turn tokens, so generation stops where the model's turn ends.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    marker: str  # a string only this format's Jinja template contains
    template: str  # Ollama's Go template
    stops: tuple[str, ...]


FORMATS = (
    ChatFormat("<|im_start|>",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("<|start_header_id|>",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("<start_of_turn>",
               "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}"
               "{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
               ("<start_of_turn>", "<end_of_turn>")),
    ChatFormat("<|assistant|>",
               "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
               ("<|end|>", "<|user|>", "<|assistant|>")),
)


def modelfile_text(source: str, adapter: str | None, chat_template: str | None, eos_token: str | None) -> str:
    """The Modelfile: FROM `source`, ADAPTER `adapter` (when given), TEMPLATE and stop tokens."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    chat = next((f for f in FORMATS if chat_template and f.marker in chat_template), None)
    if chat is not None:
        lines.append(f'TEMPLATE """{chat.template}"""')
    stops = [*(chat.stops if chat else ()), *([eos_token] if eos_token else [])]
    lines.extend(f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops))
    return "\n".join(lines) + "\n"
