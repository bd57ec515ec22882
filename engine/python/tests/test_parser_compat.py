"""What govllm's parsing relies on in vLLM's parser library (govllm/parser_compat.py), checked
against the installed vLLM: this fails the day an upgrade renames or reshapes any of it."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this interpreter", allow_module_level=True)

from govllm import parser_compat  # noqa: E402

SHIPPED_TOOL_PARSERS = ["hermes", "llama3_json", "mistral", "qwen3_xml", "pythonic", "openai"]
SHIPPED_REASONING_PARSERS = ["deepseek_r1", "qwen3", "openai_gptoss"]


def test_parser_names_are_registered():
    assert set(SHIPPED_TOOL_PARSERS) <= set(parser_compat.tool_parser_names())
    assert set(SHIPPED_REASONING_PARSERS) <= set(parser_compat.reasoning_parser_names())


def test_get_parser_signature():
    from vllm.parser import ParserManager

    params = inspect.signature(ParserManager.get_parser).parameters
    for name in ("tool_parser_name", "reasoning_parser_name", "enable_auto_tools", "model_name",
                 "is_harmony", "tokenizer"):
        assert name in params, name


def test_parser_methods():
    from vllm.parser.abstract_parser import DelegatingParser, Parser

    parse = inspect.signature(Parser.parse).parameters
    assert list(parse)[:3] == ["self", "model_output", "request"]
    assert {"enable_auto_tools", "model_output_token_ids"} <= set(parse)
    delta = inspect.signature(Parser.parse_delta).parameters
    assert list(delta)[:5] == ["self", "delta_text", "delta_token_ids", "request", "prompt_token_ids"]
    assert delta["finished"].kind is inspect.Parameter.KEYWORD_ONLY
    init = inspect.signature(Parser.__init__).parameters
    assert list(init)[:3] == ["self", "tokenizer", "tools"]
    for attr in ("reasoning_parser_cls", "tool_parser_cls", "tool_strict_level"):
        assert hasattr(DelegatingParser, attr), attr


def test_delta_message_fields():
    from vllm.entrypoints.generate.base.protocol import (
        DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
    )

    assert {"content", "reasoning", "tool_calls"} <= set(DeltaMessage.model_fields)
    assert {"id", "type", "index", "function"} <= set(DeltaToolCall.model_fields)
    assert {"name", "arguments"} <= set(DeltaFunctionCall.model_fields)
    assert {"id", "name", "arguments"} <= set(FunctionCall.model_fields)


def test_chat_completion_request_fields():
    req = parser_compat.make_request("m", [{"role": "user", "content": "hi"}],
                                     [{"type": "function", "function": {"name": "f", "parameters": {}}}], "auto")
    assert req.tool_choice == "auto" and req.tools[0].function.name == "f"
    assert req.include_reasoning is True
    assert parser_compat.make_request("m", [{"role": "user", "content": "hi"}], None, None).tools is None


def test_make_tool_call_id():
    assert parser_compat.make_tool_call_id().startswith("chatcmpl-tool-")


def test_harmony_composition_is_frozen(tokenizer):
    """vLLM sets the classes on the shared HarmonyParser; compose freezes them per composition."""
    both = parser_compat.compose("openai", "openai_gptoss", tokenizer, "m")
    tools_only = parser_compat.compose("openai", None, tokenizer, "m")
    assert both.reasoning_parser_cls is not None and tools_only.reasoning_parser_cls is None
    assert both.tool_parser_cls is tools_only.tool_parser_cls is not None


def test_import_has_no_side_effects_on_torch():
    """Importing vLLM's parsers (what a transformers-backend server with a parser does) keeps
    torch's thread count and starts no threads."""
    code = (
        "import threading, torch; torch.set_num_threads(2); n=threading.active_count();"
        "import govllm.parser_compat as c; c.tool_parser_names(); import vllm.parser;"
        "print(torch.get_num_threads(), threading.active_count() - n)"
    )
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["2", "0"], out.stdout
