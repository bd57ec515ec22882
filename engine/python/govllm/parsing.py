"""Tool-call and reasoning parsing of choices' output text with vLLM's own parser library.

Go detokenizes every choice and, for a request that asks for parsing, hands the text here: whole
(a non-streamed response) or delta by delta (streamed). Both backends run in this interpreter, so
both get exactly vLLM's parsers (``--tool-call-parser`` / ``--reasoning-parser``). vLLM is
imported only by ``parser_compat`` and only when ``Parsers.load`` is given a name.
"""

from __future__ import annotations

import logging
from typing import Any

from . import parser_compat as compat

log = logging.getLogger("govllm.parsing")


def _flag_error(tool_call_parser: str | None, reasoning_parser: str | None, exc: Exception) -> ValueError:
    msg = str(exc)
    if "has not been registered" in msg or "not been registered" in msg:
        parts = []
        if tool_call_parser and tool_call_parser not in compat.tool_parser_names():
            parts.append(f"--tool-call-parser {tool_call_parser}: unknown tool call parser; valid names: "
                         + ", ".join(compat.tool_parser_names()))
        if reasoning_parser and reasoning_parser not in compat.reasoning_parser_names():
            parts.append(f"--reasoning-parser {reasoning_parser}: unknown reasoning parser; valid names: "
                         + ", ".join(compat.reasoning_parser_names()))
        if parts:
            return ValueError("; ".join(parts))
    flags = " and ".join(f for f in (tool_call_parser and f"--tool-call-parser {tool_call_parser}",
                                     reasoning_parser and f"--reasoning-parser {reasoning_parser}") if f)
    if flags and flags in msg:
        return ValueError(msg)
    return ValueError(f"{flags}: {msg}")


class Parsers:
    """The parser classes the server was started with (``--tool-call-parser``, ``--reasoning-parser``)."""

    def __init__(self, tool_call_parser: str | None, reasoning_parser: str | None, tokenizer: Any,
                 model_name: str, classes: dict[tuple[bool, bool], type | None]) -> None:
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._classes = classes  # (tools, reasoning) -> composed class (None: nothing to parse)

    @classmethod
    def load(cls, tool_call_parser: str | None, reasoning_parser: str | None, tokenizer: Any,
             model_name: str) -> "Parsers | None":
        """None when both are None/empty; ValueError naming the flag for a bad name or tokenizer."""
        tool_call_parser = tool_call_parser or None
        reasoning_parser = reasoning_parser or None
        if tool_call_parser is None and reasoning_parser is None:
            return None
        classes: dict[tuple[bool, bool], type | None] = {}
        # Every combination a request can ask for, composed (and validated) once at start: a request
        # that asks only for reasoning must not run the tool parser, and vice versa.
        for tools in (True, False):
            for reasoning in (True, False):
                t = tool_call_parser if tools else None
                r = reasoning_parser if reasoning else None
                if t is None and r is None:
                    classes[(tools, reasoning)] = None
                    continue
                try:
                    classes[(tools, reasoning)] = compat.compose(t, r, tokenizer, model_name)
                except (TypeError, ValueError, KeyError) as exc:
                    raise _flag_error(t, r, exc) from exc
        return cls(tool_call_parser, reasoning_parser, tokenizer, model_name, classes)

    def for_request(self, request: dict[str, Any], tool_calls: bool, reasoning: bool) -> "RequestParser":
        tool_calls = bool(tool_calls and self.tool_call_parser)
        reasoning = bool(reasoning and self.reasoning_parser)
        return RequestParser(self, request, tool_calls, reasoning, self._classes[(tool_calls, reasoning)])


def _messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in request.get("messages") or []:
        msg = {k: v for k, v in m.items() if v is not None and k in ("role", "content", "tool_calls",
                                                                      "tool_call_id", "name")}
        if msg.get("role") == "assistant" and "content" not in msg:
            msg["content"] = None
        out.append(msg)
    return out


class _Choice:
    __slots__ = ("parser", "failed", "seen", "tools_called")

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.failed = parser is None
        self.seen: set[int] = set()  # call indices whose first piece was sent
        self.tools_called = False


class RequestParser:
    """One request's parsing: one vLLM Parser per choice index (they are stateful), made lazily."""

    def __init__(self, parsers: Parsers, request: dict[str, Any], tool_calls: bool, reasoning: bool,
                 cls: type | None) -> None:
        self.parsers = parsers
        self.tool_calls = tool_calls
        self.reasoning = reasoning
        self._cls = cls
        self._choices: dict[int, _Choice] = {}
        self._prompt_token_ids = list(request.get("prompt_token_ids") or [])
        self._vllm_request = None
        if cls is not None:
            tools = request.get("tools") or None
            self._vllm_request = compat.make_request(
                model=parsers.model_name or "model", messages=_messages(request), tools=tools,
                tool_choice=("auto" if tool_calls else "none") if tools else None,
                chat_template_kwargs=request.get("chat_template_kwargs") or None)

    def _choice(self, index: int) -> _Choice:
        ch = self._choices.get(index)
        if ch is None:
            parser = None
            if self._cls is not None:
                try:
                    parser = compat.new_parser(self._cls, self.parsers.tokenizer, self._vllm_request)
                except Exception:
                    log.exception("creating the %s parser failed; choice %d passes through as content",
                                  self._describe(), index)
            ch = self._choices[index] = _Choice(parser)
        return ch

    def _describe(self) -> str:
        return "/".join(n for n in (self.tool_calls and self.parsers.tool_call_parser,
                                    self.reasoning and self.parsers.reasoning_parser) if n) or "no"

    def feed(self, index: int, text: str, token_ids: list[int], finished: bool, whole: bool) -> dict[str, Any]:
        """One choice's new output (see the module docstring); returns content/reasoning/tool_calls."""
        ch = self._choice(index)
        if ch.failed:
            return self._result(ch, text or None, None, [])
        try:
            if whole:
                parsed = compat.parse(ch.parser, text, self._vllm_request, list(token_ids))
            else:
                parsed = compat.parse_delta(ch.parser, text, list(token_ids), self._vllm_request,
                                            self._prompt_token_ids, finished)
        except Exception:
            log.exception("the %s parser failed on choice %d; its text passes through as content",
                          self._describe(), index)
            ch.failed = True
            return self._result(ch, text or None, None, [])
        if parsed is None:
            return self._result(ch, None, None, [])
        return self._result(ch, parsed.content, parsed.reasoning, self._pieces(ch, parsed.calls))

    def _pieces(self, ch: _Choice, calls: list[compat.CallPiece]) -> list[dict[str, Any]]:
        # Pieces of the same call within one delta are merged (vLLM's parsers may send the name and
        # the first arguments as two entries); a call's first piece always has id, type and name.
        out: list[dict[str, Any]] = []
        for c in calls:
            if out and out[-1]["index"] == c.index and not (c.name and out[-1]["name"]):
                last = out[-1]
                if c.arguments:
                    last["arguments"] = (last["arguments"] or "") + c.arguments
                last["id"] = last["id"] or c.id
                last["type"] = last["type"] or c.type
                last["name"] = last["name"] or c.name
                continue
            out.append({"index": c.index, "id": c.id, "type": c.type, "name": c.name, "arguments": c.arguments})
        for piece in out:
            if piece["index"] not in ch.seen:
                ch.seen.add(piece["index"])
                piece["id"] = piece["id"] or compat.make_tool_call_id()
                piece["type"] = piece["type"] or "function"
            else:
                piece["id"] = piece["type"] = None
                if piece["name"]:
                    log.warning("parser sent a second name %r for tool call %d", piece["name"], piece["index"])
                piece["name"] = None
        out = [p for p in out if p["id"] is not None or p["arguments"]]
        if out:
            ch.tools_called = True
        return out

    @staticmethod
    def _result(ch: _Choice, content: str | None, reasoning: str | None,
                tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        return {"content": content, "reasoning": reasoning, "tool_calls": tool_calls,
                "tools_called": ch.tools_called}
