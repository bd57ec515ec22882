"""The request JSON from Go, and the sampling defaults of a model's generation_config.json.

A request is ``{"request_id"?, "messages" | "prompt" | "prompt_token_ids", "sampling": {...}}``.
A sampling field is set when its key is present (and not null): then it overrides the model's
default, also when it is the neutral value (``top_k`` 0 or -1, ``top_p`` 1.0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from .backend import ChatOptions, RequestError, SamplingParams

log = logging.getLogger("govllm")

# generation_config.json keys vLLM's server takes as sampling defaults, exactly these
# (ModelConfig.get_diff_sampling_param); max_new_tokens is the default max_tokens. Not the
# presence/frequency penalties: Go sends a zero penalty as unset, so such a default could not be undone.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
# Meaningless for greedy decoding (do_sample false).
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p")


def generation_defaults(model_dir: str) -> dict[str, Any]:
    """The model's recommended sampling, as SamplingParams fields (max_new_tokens as max_tokens).

    ``do_sample: false`` (Hugging Face's greedy) gives temperature 0 and drops top_p/top_k/min_p.
    """
    try:
        with open(os.path.join(model_dir, "generation_config.json")) as f:
            gc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(gc, dict):
        return {}
    defaults = {k: gc[k] for k in GENERATION_DEFAULTS if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        defaults = {k: v for k, v in defaults.items() if k not in _SAMPLING_ONLY}
        defaults["temperature"] = 0.0
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    if defaults:
        log.info("sampling defaults from the model's generation_config.json: %s", defaults)
    return defaults


@dataclasses.dataclass
class Request:
    request_id: str
    messages: list[Any] | None
    prompt: str | None
    prompt_token_ids: list[int] | None
    sampling: SamplingParams
    default_max_tokens: int | None  # the model's, when the request left max_tokens unset
    tools: list[Any] | None = None  # OpenAI tools: rendered by the chat template, given to the parsers
    parsing: dict[str, Any] | None = None  # {"tool_calls", "reasoning", "streamed"}: run the parsers
    raw: dict[str, Any] | None = None  # the request as Go sent it (what the parsers read)
    chat: ChatOptions | None = None  # chat-template options; None: vLLM's defaults
    adapter: str | None = None  # the LoRA adapter ("lora"), None for the base model


def parse_request(data: bytes, fallback_id: str, defaults: dict[str, Any]) -> Request:
    """The request in ``data`` with ``defaults`` (generation_defaults) under its sampling. RequestError
    for anything malformed, so that only the request's own mistakes become 4xx."""
    try:
        req = json.loads(data)
    except ValueError as exc:
        raise RequestError(f"the request is not valid JSON: {exc}") from exc
    if not isinstance(req, dict):
        raise RequestError("the request must be a JSON object")
    request_id = req.get("request_id")
    request_id = fallback_id if request_id in (None, "") else str(request_id)
    given = req.get("sampling")
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise RequestError("sampling must be an object", param="sampling")
    given = {k: v for k, v in given.items() if v is not None}
    merged = {k: v for k, v in defaults.items() if k != "max_tokens"}
    merged.update(given)
    try:
        sampling = SamplingParams.from_dict(merged)
    except RequestError:
        raise
    except (TypeError, ValueError) as exc:
        raise RequestError(f"invalid sampling parameters: {exc}", param="sampling") from exc
    default_max = defaults.get("max_tokens") if "max_tokens" not in given else None
    ids = req.get("prompt_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt_token_ids must be a list of integers", param="prompt_token_ids")
    tools = req.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be an array", param="tools")
    parsing = req.get("parsing")
    if parsing is not None and not isinstance(parsing, dict):
        raise RequestError("parsing must be an object", param="parsing")
    chat = ChatOptions.from_dict(req["chat"]) if req.get("chat") is not None else None
    adapter = req.get("lora")
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError("lora must be an adapter name", param="model")
    return Request(request_id=request_id, messages=req.get("messages"), prompt=req.get("prompt"),
                   prompt_token_ids=ids, sampling=sampling,
                   default_max_tokens=int(default_max) if default_max is not None else None,
                   tools=tools or None, parsing=parsing or None, raw=req, chat=chat, adapter=adapter or None)


def apply_default_max_tokens(req: Request, prompt_len: int, max_model_len: int) -> None:
    """max_tokens from the model's max_new_tokens, capped by the room left in the context (as vLLM's
    get_max_tokens); nothing when the request set max_tokens or the prompt fills the context."""
    if req.default_max_tokens is None or req.sampling.max_tokens is not None:
        return
    room = max_model_len - prompt_len
    if room >= 1 and req.default_max_tokens >= 1:
        req.sampling.max_tokens = min(req.default_max_tokens, room)
        req.sampling.validate()
