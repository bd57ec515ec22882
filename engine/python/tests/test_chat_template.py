"""Tool-aware chat rendering: render_chat(tools, chat_template), load_chat_template (--chat-template)
and templates/chatml_tools.jinja on the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO_ROOT
from govllm.backend import RequestError, load_chat_template, render_chat

TEMPLATE = REPO_ROOT / "templates" / "chatml_tools.jinja"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21C, sunny"},
    {"role": "assistant", "content": "It is 21C and sunny in Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "tomorrow?"}]},
]


def test_load_chat_template(tmp_path):
    assert load_chat_template(None) is None and load_chat_template("") is None
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")
    with pytest.raises(ValueError, match=r"--chat-template /no/such/template\.jinja: .*cannot be opened"):
        load_chat_template("/no/such/template.jinja")


def test_chatml_tools_round_trip(tokenizer):
    text = render_chat(tokenizer, CONVERSATION, TOOLS, load_chat_template(str(TEMPLATE)))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(tools_block) == TOOLS[0]["function"]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n") in text
    assert "<|im_start|>user\n<tool_response>\n21C, sunny\n</tool_response><|im_end|>\n" in text
    assert "<|im_start|>assistant\nIt is 21C and sunny in Paris.<|im_end|>\n" in text
    assert "<|im_start|>user\nAnd\ntomorrow?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chatml_tools_without_tools_is_smollm2s_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    assert render_chat(tokenizer, msgs, None, load_chat_template(str(TEMPLATE))) == render_chat(tokenizer, msgs)


def test_render_chat_hands_templates_what_vllm_does(tokenizer):
    """Arguments become dicts (bad JSON -> {}), tool messages keep tool_call_id and name, the
    assistant's null content stays null, tools reach the template."""
    probe = ("{% for m in messages %}{{ m['role'] }}|{{ m['content'] is none }}|"
             "{% for c in m.get('tool_calls') or [] %}{{ c['function']['arguments'] is mapping }}"
             "{{ c['function']['arguments'] | tojson }}{% endfor %}|{{ m.get('tool_call_id') }}|{{ m.get('name') }}\n"
             "{% endfor %}{{ tools | length if tools else 0 }}")
    msgs = CONVERSATION[:3] + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    out = render_chat(tokenizer, msgs, TOOLS, probe).splitlines()
    assert out[1] == 'assistant|True|True{"city": "Paris"}|None|None'
    assert out[2] == "tool|False||call_1|get_weather"
    assert out[3] == "assistant|True|True{}|None|None"
    assert out[4] == "1"


def test_render_chat_template_errors_are_the_clients(tokenizer):
    with pytest.raises(RequestError) as e:
        render_chat(tokenizer, [{"role": "user", "content": "x"}], None, "{{ raise_exception('no users') }}")
    assert e.value.param == "messages"
    with pytest.raises(RequestError) as e:
        render_chat(tokenizer, [{"role": "assistant", "content": None, "tool_calls": [{"type": "custom"}]}])
    assert e.value.param == "messages"


def test_hf_backend_uses_the_override(tokenizer):
    """apply_chat_template: --chat-template (resolved at start) wins, and a tokenizer without a
    template is fine when there is one."""
    from govllm.backends.hf.backend import TransformersBackend as HFBackend

    backend = object.__new__(HFBackend)
    backend.tokenizer = tokenizer
    backend.prompt_encoder = lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]
    backend._chat_template = load_chat_template(str(TEMPLATE))
    ids = backend.apply_chat_template(CONVERSATION, TOOLS)
    assert "<tools>" in tokenizer.decode(ids)
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert backend.apply_chat_template(CONVERSATION[:1]) == backend.prompt_encoder(
            render_chat(tokenizer, CONVERSATION[:1], None, backend._chat_template), False)
        backend._chat_template = None
        with pytest.raises(RequestError, match="no chat template"):
            backend.apply_chat_template(CONVERSATION[:1])
    finally:
        tokenizer.chat_template = saved


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_rendered_tool_call_parses_back_with_hermes(tokenizer):
    """What the template renders as an assistant call is what --tool-call-parser hermes reads."""
    from govllm.parsing import Parsers

    text = render_chat(tokenizer, CONVERSATION[:2], TOOLS, load_chat_template(str(TEMPLATE)))
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    rp = Parsers.load("hermes", None, tokenizer, "m").for_request({"messages": CONVERSATION[:1], "tools": TOOLS},
                                                                 True, False)
    out = rp.feed(0, turn, tokenizer.encode(turn), True, True)
    assert [(c["name"], json.loads(c["arguments"])) for c in out["tool_calls"]] == [("get_weather", {"city": "Paris"})]
