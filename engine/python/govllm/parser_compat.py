"""Every use of vLLM's parser library (``vllm.parser``, ``vllm.tool_parsers``, ``vllm.reasoning``) in one place.

``parsing.py`` is written against this module only; ``tests/test_parser_compat.py`` checks that the
pinned vLLM still has what is used here (names, signatures, ``DeltaMessage`` fields), so a vLLM
upgrade that moves them fails CI rather than a request.

Nothing here imports vLLM at module import time: importing ``vllm.parser`` takes seconds and
imports vLLM's platform detection, so it happens only when a parser is configured (both backends
run in this interpreter; the transformers backend must not pay for it otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The tool parser whose output is gpt-oss' harmony format. vLLM picks its HarmonyParser from the
# model type (gpt_oss); here the names say it.
HARMONY_TOOL_PARSER = "openai"
HARMONY_REASONING_PARSER = "openai_gptoss"


@dataclasses.dataclass
class CallPiece:
    """One ``DeltaToolCall`` (or a whole call, non-streamed) as plain values."""

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclasses.dataclass
class Parsed:
    """What one ``parse`` / ``parse_delta`` returned, as plain values."""

    content: str | None = None
    reasoning: str | None = None
    calls: list[CallPiece] = dataclasses.field(default_factory=list)


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted(set(ToolParserManager.tool_parsers) | set(ToolParserManager.lazy_parsers))


def reasoning_parser_names() -> list[str]:
    from vllm.reasoning import ReasoningParserManager

    return ReasoningParserManager.list_registered()


def compose(tool_parser: str | None, reasoning_parser: str | None, tokenizer: Any, model_name: str) -> type | None:
    """vLLM's Parser class for the two names (either may be None), validated against ``tokenizer``.

    ``ParserManager.get_parser`` as vLLM's chat serving calls it (auto tools enabled). The class it
    returns is frozen into a subclass: for harmony vLLM sets the parser classes as attributes of
    the shared ``HarmonyParser`` class, which a second composition would overwrite. Raises
    TypeError (vLLM's) for an unknown name or a tokenizer the parsers cannot work with.
    """
    from vllm.parser import ParserManager

    is_harmony = tool_parser == HARMONY_TOOL_PARSER or reasoning_parser == HARMONY_REASONING_PARSER
    cls = ParserManager.get_parser(
        tool_parser_name=tool_parser or None,
        reasoning_parser_name=reasoning_parser or None,
        enable_auto_tools=True,
        model_name=model_name,
        is_harmony=is_harmony,
        tokenizer=tokenizer,
    )
    if cls is None:
        return None
    frozen = type(cls.__name__, (cls,), {
        "reasoning_parser_cls": cls.reasoning_parser_cls,
        "tool_parser_cls": cls.tool_parser_cls,
        "tool_strict_level": cls.tool_strict_level,
    })
    frozen.__module__ = cls.__module__
    return frozen


def make_request(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 tool_choice: str | None, chat_template_kwargs: dict[str, Any] | None = None) -> Any:
    """The ``ChatCompletionRequest`` vLLM's parsers read (tools, tool_choice, include_reasoning)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fields: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        fields["tools"] = tools
    if tool_choice is not None:
        fields["tool_choice"] = tool_choice
    if chat_template_kwargs:
        fields["chat_template_kwargs"] = chat_template_kwargs
    return ChatCompletionRequest(**fields)


def new_parser(cls: type, tokenizer: Any, request: Any) -> Any:
    """One Parser instance (stateful: one per choice), as vLLM's serving makes it."""
    return cls(tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs or {})


def parse(parser: Any, text: str, request: Any, token_ids: list[int]) -> Parsed:
    """``Parser.parse`` on a complete output; calls without an id get one (vLLM's serving does)."""
    from vllm.renderers.chat_utils import make_tool_call_id

    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True,
                                             model_output_token_ids=token_ids)
    return Parsed(content=content, reasoning=reasoning, calls=[
        CallPiece(index=i, id=fc.id or make_tool_call_id(), type="function", name=fc.name,
                  arguments=fc.arguments)
        for i, fc in enumerate(calls or [])
    ])


def parse_delta(parser: Any, text: str, token_ids: list[int], request: Any, prompt_token_ids: list[int],
                finished: bool) -> Parsed | None:
    """``Parser.parse_delta`` on the next piece of a streamed output; None: nothing to send yet.

    ``prompt_token_ids`` must be a list (``[]`` when unknown): with None, vLLM never marks
    reasoning as ended, so a tool parser without a reasoning parser would never run.
    """
    msg = parser.parse_delta(text, token_ids, request, prompt_token_ids, finished=finished)
    if msg is None:
        return None
    calls = []
    for tc in msg.tool_calls or []:
        fn = tc.function
        calls.append(CallPiece(index=tc.index, id=tc.id, type=tc.type,
                               name=fn.name if fn is not None else None,
                               arguments=fn.arguments if fn is not None else None))
    return Parsed(content=msg.content, reasoning=msg.reasoning, calls=calls)


def make_tool_call_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id as make

    return make()
