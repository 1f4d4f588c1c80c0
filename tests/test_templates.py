import pytest

from lorakit.engine.data.templates import BUILTIN_TEMPLATES, FAMILY_TOKENS, get_template, render
from lorakit.errors import UserError

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6"}],
]


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_builtin_renders_like_transformers(name, chat):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = CHATS[chat]
    for generation, conv in ((False, messages), (True, messages[:-1])):
        ours = render(conv, BUILTIN_TEMPLATES[name], add_generation_prompt=generation, **FAMILY_TOKENS[name])
        theirs = render_jinja_template([conv], chat_template=BUILTIN_TEMPLATES[name],
                                       add_generation_prompt=generation, **FAMILY_TOKENS[name])
        theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
        assert ours == theirs


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_prompt_with_generation_prompt_is_prefix_of_full_chat(name):
    """What train masking relies on: the prompt rendering is a prefix, the rest is the reply."""
    tokens = FAMILY_TOKENS[name]
    for messages in CHATS:
        prompt = render(messages[:-1], BUILTIN_TEMPLATES[name], add_generation_prompt=True, **tokens)
        full = render(messages, BUILTIN_TEMPLATES[name], **tokens)
        assert full.startswith(prompt)
        assert messages[-1]["content"] in full[len(prompt):]


EXPECTED = {
    "chatml": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>",
    "mistral": "<s>[INST] Hi there [/INST] Hello! How can I help?</s>",
    "gemma": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello! How can I help?"
             "<end_of_turn>\n",
    "phi3": "<|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|endoftext|>",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nHi there\n\n### Response:\nHello! How can I help?</s>\n\n",
}


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_exact_family_format(name):
    assert render(CHATS[0], get_template(name), **FAMILY_TOKENS[name]) == EXPECTED[name]


def test_system_prompt_placement():
    chat = CHATS[1]
    mistral = render(chat, BUILTIN_TEMPLATES["mistral"], **FAMILY_TOKENS["mistral"])
    assert mistral == "<s>[INST] What is 2+2? [/INST] 4</s>[INST] Be brief.\n\nAnd 3+3? [/INST] 6</s>"
    gemma = render(chat, BUILTIN_TEMPLATES["gemma"], **FAMILY_TOKENS["gemma"])
    assert gemma.startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>")


def test_qwen_renders_tools():
    tools = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}]
    text = render(CHATS[0], BUILTIN_TEMPLATES["qwen2.5"], tools=tools)
    assert "<tools>\n" + '{"type": "function", "function": {"name": "get_order"' in text


def test_template_errors_become_value_errors():
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        render(bad, BUILTIN_TEMPLATES["mistral"])


def test_get_template_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as e:
        get_template("llama2")
    assert "llama2" in str(e.value) and "chatml" in str(e.value) and "qwen2.5" in str(e.value)


def test_get_template_missing_file():
    with pytest.raises(UserError, match="file not found"):
        get_template("templates/mine.jinja")


def test_get_template_user_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}")
    assert render(CHATS[0], get_template(str(path))) == "USER: Hi there\nASSISTANT: Hello! How can I help?\n"
    path.write_text("{% for m in messages %}")
    with pytest.raises(UserError, match=r"t\.jinja:1: invalid Jinja"):
        get_template(str(path))


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(ValueError):
        render(CHATS[0], "{{ messages.__class__.__mro__ }}")


def test_generation_tag_is_accepted():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert render(CHATS[0], template) == "Hi thereHello! How can I help?"


def test_a_template_file_that_is_not_text_exits_2(tmp_path):
    path = tmp_path / "binary.jinja"
    path.write_bytes(b"\x00\x01\xff\xfe{{ messages }}")
    with pytest.raises(UserError, match="binary.jinja: not UTF-8 text"):
        get_template(str(path))


@pytest.mark.parametrize("body", ["{% for i in range(10**9) %}x{% endfor %}", "{{ 1 / 0 }}",
                                  "{{ messages[0]['content'] | int + 'x' }}"])
def test_any_failure_inside_a_template_is_its_own_error(body):
    with pytest.raises(ValueError, match="chat template: rendering failed"):
        render(CHATS[0], body)
