"""CMD_TOKENIZE: tokenizing and detokenizing without generating (Go's engine/tokenize.go).

A command is JSON: ``{"op": "tokenize", "prompt" | "messages", "tools"?, "add_special_tokens",
"add_generation_prompt", "continue_final_message"?, "chat_template_kwargs"?, "return_token_strs"?,
"request_id"?}`` or ``{"op": "detokenize", "tokens": [...]}``. The answer (EV_TOKENIZED) is
``{"tokens": [...], "token_strs": [...] | null}`` or ``{"text": "..."}``; a refusal is a
RequestError the bridge sends as EV_ERROR.

Messages go through the backend's own ``apply_chat_template`` with the same ``ChatOptions`` a
chat request carries, as ``Bridge._prompt_ids`` calls it, so the count is the prompt a chat
completion of the same messages (and options) would have. The work is one synchronous call on the loop, as a
request's own tokenization is: there is nothing to cancel.
"""

from __future__ import annotations

import json
from typing import Any

from .backend import ChatOptions, RequestError


class NoTokenizerError(RequestError):
    """The backend has no tokenizer to tokenize without generating (HTTP 501)."""

    status = 501
    type = "NotImplementedError"


def parse(data: bytes) -> dict[str, Any]:
    """A CMD_TOKENIZE payload as a dict (RequestError when it is not one)."""
    try:
        cmd = json.loads(data)
    except ValueError as exc:
        raise RequestError(f"bad tokenize command: {exc}") from exc
    if not isinstance(cmd, dict):
        raise RequestError("bad tokenize command: not an object")
    return cmd


def handle(backend: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """Serve one parsed CMD_TOKENIZE; RequestError (or a subclass) for what the client got wrong."""
    op = cmd.get("op")
    if op == "tokenize":
        return tokenize(backend, cmd)
    if op == "detokenize":
        return {"text": detokenize(backend, cmd.get("tokens") or [])}
    raise RequestError(f"bad tokenize command: unknown op {op!r}")


def _tokenizer(backend: Any) -> Any:
    tok = getattr(backend, "tokenizer", None)
    if tok is None:
        raise NoTokenizerError(f"the {getattr(backend, 'name', 'custom')} backend has no tokenizer: "
                               "/tokenize and /detokenize are not available")
    return tok


def _encode(backend: Any, tok: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Text -> ids as the backend tokenizes prompts (Go's encoder when it reproduces the tokenizer)."""
    encoder = getattr(backend, "prompt_encoder", None)
    if encoder is not None:
        return [int(t) for t in encoder(text, add_special_tokens)]
    return [int(t) for t in tok.encode(text, add_special_tokens=add_special_tokens)]


def tokenize(backend: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """The ids (and with return_token_strs their tokens) of a prompt or of rendered messages."""
    tok = _tokenizer(backend)
    messages = cmd.get("messages")
    add_special = bool(cmd.get("add_special_tokens"))
    if messages:
        ids = _render_ids(backend, tok, messages, cmd, add_special)
    elif isinstance(cmd.get("prompt"), str) and cmd["prompt"]:
        ids = _encode(backend, tok, cmd["prompt"], add_special)
    else:
        raise RequestError("exactly one of prompt and messages must be set", param="prompt")
    strs = None
    if cmd.get("return_token_strs"):
        strs = [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return {"tokens": ids, "token_strs": strs}


def _render_ids(backend: Any, tok: Any, messages: list[Any], cmd: dict[str, Any], add_special: bool) -> list[int]:
    """The prompt ids generation would see for these messages: the backend's own
    apply_chat_template (as Bridge._prompt_ids calls it), with vLLM's chat options."""
    tools = cmd.get("tools") or None
    opts = ChatOptions.from_dict({
        "add_generation_prompt": cmd.get("add_generation_prompt", True),
        "continue_final_message": cmd.get("continue_final_message", False),
        "add_special_tokens": add_special,
        "chat_template_kwargs": cmd.get("chat_template_kwargs") or None,
    })
    if opts == ChatOptions():
        if tools:
            return [int(t) for t in backend.apply_chat_template(messages, tools=tools)]
        return [int(t) for t in backend.apply_chat_template(messages)]
    return [int(t) for t in backend.apply_chat_template(messages, tools=tools, options=opts)]


def _vocab_limit(tok: Any) -> int:
    """The largest id the tokenizer knows."""
    limit = getattr(tok, "max_token_id", None)
    if isinstance(limit, int):
        return limit
    return len(tok) - 1


def detokenize(backend: Any, tokens: list[Any]) -> str:
    """The text of ids as the tokenizer's decode gives it by default: special tokens kept (vLLM's
    /detokenize); an id outside the vocabulary is the client's 400."""
    tok = _tokenizer(backend)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError("tokens must be an array of integers", param="tokens")
    limit = _vocab_limit(tok)
    for t in tokens:
        if t < 0 or t > limit:
            raise RequestError(f"Token id {t} is out of vocabulary", param="tokens")
    return str(tok.decode(tokens, skip_special_tokens=False))
