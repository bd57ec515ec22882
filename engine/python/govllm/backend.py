"""The surface every backend presents to the bridge, modelled on vLLM's AsyncLLM.

A backend is created by a module-level ``create(config: EngineConfig) -> Backend`` function,
started once with ``await backend.start()`` on the bridge's event loop, and then serves any
number of concurrent ``generate`` calls on that loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol


@dataclasses.dataclass
class EngineConfig:
    """What the Go side asks for. Unknown keys from Go land in ``extra``."""

    model: str
    engine: str = "transformers"
    served_model_name: str = ""
    max_model_len: int = 0  # 0: from the model's config
    max_num_seqs: int = 0  # 0: the backend's default
    dtype: str = "auto"
    seed: int = 0
    device: str = ""  # "" = auto (cuda when available, else cpu)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        return cls(**known, extra=extra)


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling. ``max_tokens=None`` means until the context is full."""

    max_tokens: int | None = None
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (-1, vLLM's "off", is stored as 0)
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0  # in [-2, 2]; 0 = off
    frequency_penalty: float = 0.0  # in [-2, 2]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off
    min_tokens: int = 0
    logprobs: int | None = None  # None = off; N = the chosen token's logprob and the N most likely
    # None = off; N = each prompt token's logprob (after the first) and the N most likely there
    # (vLLM's prompt_logprobs; emitted as EV_PROMPT_LOGPROBS before the first delta).
    prompt_logprobs: int | None = None
    # Text options. Go applies them for token-id backends (it detokenizes and matches stop
    # strings); a text backend (generate) gets them to apply itself.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Constraints. structured_outputs: exactly one of "json" (a schema: object or JSON text),
    # "json_object" (true), "regex", "choice" (list of strings), "grammar" (EBNF or Lark), plus
    # "param": the request field it came from (for errors). logit_bias: token id -> bias in
    # [-100, 100]. allowed_token_ids: the only tokens that may be sampled. bad_words: words that
    # may not be generated (vLLM's rule: tokenized with and without a leading space).
    structured_outputs: dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError) as exc:
                raise RequestError(f"logit_bias must map token ids to numbers: {exc}", param="logit_bias") from exc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RequestError(f"unknown sampling parameter(s): {', '.join(unknown)}", param=unknown[0])
        sp = cls(**{k: v for k, v in d.items() if v is not None})
        sp.validate()
        return sp

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature must be non-negative, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise RequestError(f"top_k must be non-negative, got {self.top_k}", param="top_k")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}", param="n")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {value}", param=name)
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}",
                               param="repetition_penalty")
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be non-negative, got {self.min_tokens}", param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                               f"got {self.min_tokens}", param="min_tokens")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise RequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}", param="logprobs")
        plp = self.prompt_logprobs
        if plp is not None and (isinstance(plp, bool) or not isinstance(plp, int) or not 0 <= plp <= 20):
            raise RequestError(f"prompt_logprobs must be an integer in [0, 20], got {plp!r}", param="prompt_logprobs")
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in STRUCTURED_KINDS if so.get(k) not in (None, False, "")]
            if len(kinds) != 1:
                raise RequestError("structured_outputs must set exactly one of " + ", ".join(STRUCTURED_KINDS),
                                   param=str(so.get("param") or "structured_outputs"))
        for tid, bias in (self.logit_bias or {}).items():
            if tid < 0 or not -100 <= bias <= 100:
                raise RequestError(f"logit_bias maps token ids (>= 0) to biases in [-100, 100], got {tid}: {bias}",
                                   param="logit_bias")
        if self.allowed_token_ids is not None and any(int(t) < 0 for t in self.allowed_token_ids):
            raise RequestError("allowed_token_ids must be non-negative", param="allowed_token_ids")

    def structured_param(self) -> str:
        """The request field structured_outputs came from (what an error about it names)."""
        so = self.structured_outputs or {}
        return str(so.get("param") or "structured_outputs")

    def non_default(self) -> list[str]:
        """The names of the fields that differ from their defaults, in declaration order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _SAMPLING_DEFAULTS[f.name]]


# The constraint kinds of structured_outputs, one of which is set.
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")

_SAMPLING_DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(SamplingParams)
}


@dataclasses.dataclass
class Delta:
    """New output of one choice since the previous delta.

    ``text`` is the detokenized increment: never half a UTF-8 character, never a piece of a
    stop string that later matched. ``finish_reason`` is set on the last delta of a choice:
    "stop" (EOS, stop string or stop token), "length" (max_tokens or the context) or "abort".
    ``logprobs`` (only when the request asked for them): one entry per token of ``token_ids``,
    ``{"token": str, "logprob": float, "bytes": [int], "top": [{"token", "logprob", "bytes"}, ...]}``,
    ``top`` being the most likely tokens at that position, most likely first.
    """

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None


class RequestError(Exception):
    """The client's mistake (bad parameters, prompt too long): HTTP ``status`` for that request only.

    The only exception the bridge answers with a 4xx; any other one is a 500.
    """

    status = 400
    type = "BadRequestError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(RequestError):
    """A request names a model (an adapter) this engine does not serve: a 404, as the server answers."""

    status = 404
    type = "NotFoundError"

    def __init__(self, name: str) -> None:
        super().__init__(f"The model `{name}` does not exist.", param="model")


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One --lora-modules adapter (``extra["lora_modules"]``, written by Go's launch plan)."""

    name: str
    path: str
    base_model_name: str | None = None

    def ready(self) -> dict[str, Any]:
        """The adapter as READY reports it (llm.Adapter)."""
        d = {"name": self.name, "path": self.path}
        if self.base_model_name:
            d["base_model_name"] = self.base_model_name
        return d


def lora_modules(extra: dict[str, Any] | None) -> list[LoRAModule]:
    """The adapters of ``extra["lora_modules"]`` (a list of {name, path, base_model_name?}). Raises
    ValueError for a malformed list, a repeated name or a directory without adapter_config.json."""
    raw = (extra or {}).get("lora_modules") or []
    if not isinstance(raw, list):
        raise ValueError("lora_modules must be a list of {name, path}")
    out: list[LoRAModule] = []
    for item in raw:
        if not isinstance(item, dict) or not item.get("name") or not item.get("path"):
            raise ValueError(f"lora_modules: want {{name, path}}, got {item!r}")
        m = LoRAModule(str(item["name"]), str(item["path"]), item.get("base_model_name") or None)
        if any(o.name == m.name for o in out):
            raise ValueError(f"lora_modules: {m.name!r} given twice")
        if not os.path.isfile(os.path.join(m.path, "adapter_config.json")):
            raise ValueError(f"lora_modules: {m.name}={m.path} has no adapter_config.json")
        out.append(m)
    return out


def _text_content(content: Any) -> Any:
    """OpenAI content parts -> plain text joined with newlines (as vLLM and the Go server join them)."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type", "text") != "text":
                raise RequestError(f"unsupported content part type {part.get('type')!r} for this model",
                                   param="messages")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    return content


def _tool_call_arguments(arguments: Any) -> dict[str, Any]:
    """An assistant tool call's ``arguments`` (OpenAI: JSON text) as the dict HF chat templates expect;
    vLLM's rule (renderers/chat_utils._postprocess_messages): empty, malformed or non-object -> {}."""
    if not arguments:
        return {}
    parsed = arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            logging.getLogger("govllm.backend").warning(
                "a tool call's arguments are not valid JSON (%d chars): rendered as {}", len(arguments))
            return {}
    return parsed if isinstance(parsed, dict) else {}


def _chat_message(m: Any) -> Any:
    """One OpenAI message as vLLM hands it to an HF chat template."""
    if not isinstance(m, dict):
        return m
    msg = {**m, "content": _text_content(m.get("content"))}
    if msg.get("role") == "assistant" and "tool_calls" in msg:
        calls = msg.get("tool_calls")
        if not calls:
            msg.pop("tool_calls", None)  # keeps templates on the plain assistant path
        elif isinstance(calls, list):
            out = []
            for call in calls:
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict) \
                        or call.get("type", "function") != "function":
                    raise RequestError("chat completions only support assistant tool_calls of type 'function'",
                                       param="messages")
                fn = call["function"]
                out.append({**call, "type": "function",
                            "function": {**fn, "arguments": _tool_call_arguments(fn.get("arguments"))}})
            msg["tool_calls"] = out
    return msg


@dataclasses.dataclass
class ChatOptions:
    """vLLM's chat-template options of a request (Go's llm.ChatOptions)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # encode the rendered text with the tokenizer's special tokens
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables
    documents: list[dict[str, str]] | None = None  # for RAG templates

    @classmethod
    def from_dict(cls, d: Any) -> "ChatOptions":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise RequestError("chat must be an object", param="chat")
        opts = cls(add_generation_prompt=bool(d.get("add_generation_prompt", True)),
                   continue_final_message=bool(d.get("continue_final_message", False)),
                   add_special_tokens=bool(d.get("add_special_tokens", False)),
                   chat_template_kwargs=d.get("chat_template_kwargs") or None,
                   documents=d.get("documents"))
        if opts.chat_template_kwargs is not None and not isinstance(opts.chat_template_kwargs, dict):
            raise RequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
        if opts.documents is not None and not isinstance(opts.documents, list):
            raise RequestError("documents must be an array of objects", param="documents")
        if opts.add_generation_prompt and opts.continue_final_message:
            raise RequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                               param="continue_final_message")
        return opts


# apply_chat_template arguments a chat_template_kwargs key may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset({"add_generation_prompt", "continue_final_message", "documents", "tools",
                                       "chat_template", "tokenize", "return_dict", "conversation", "messages"})


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                chat_template: str | None = None, options: ChatOptions | None = None) -> Any:
    """The chat template (``chat_template``, else the tokenizer's) applied to OpenAI messages,
    untokenized, with a generation prompt unless ``options`` say otherwise (vLLM's
    add_generation_prompt; continue_final_message leaves the last message open; documents and
    chat_template_kwargs go to the template). Text parts are joined; assistant tool calls'
    ``arguments`` become dicts and ``tool`` messages keep ``tool_call_id``/``name`` (as vLLM
    renders for HF templates); ``tools`` (OpenAI tool objects) go to the template. Template
    errors (jinja raise_exception, bad roles) become the client's 400. Most tokenizers return a
    string, some (mistral) token ids."""
    opts = options or ChatOptions()
    msgs = [_chat_message(m) for m in messages]
    kwargs: dict[str, Any] = {}
    for key, value in (opts.chat_template_kwargs or {}).items():
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise RequestError(f"chat_template_kwargs.{key}: set it as a request field", param="chat_template_kwargs")
        kwargs[key] = value
    kwargs.update(add_generation_prompt=opts.add_generation_prompt, tokenize=False)
    if opts.continue_final_message:
        kwargs["continue_final_message"] = True
    if opts.documents is not None:
        kwargs["documents"] = opts.documents
    if tools:
        kwargs["tools"] = tools
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    try:
        return tokenizer.apply_chat_template(msgs, **kwargs)
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"chat template error: {exc}", param="messages") from exc


def prompt_logprobs_meta(token_ids: Any, logprobs: Any, ranks: Any) -> bytes:
    """The meta of an EV_PROMPT_LOGPROBS record (engine/stream.go addPromptLogprobs): for prompt
    positions 1, 2, ... (row r: the logprob of prompt token r + 1 given those before it) the token
    ids (column 0 the prompt token, then the most likely by rank), their logprobs (-inf and NaN
    as -9999, which JSON can carry) and the prompt token's rank. Array-likes of shape [rows, k+1],
    [rows, k+1] and [rows] (numpy, or CPU torch tensors)."""
    import numpy as np

    if len(ranks) == 0:
        return json.dumps({"token_ids": [], "logprobs": [], "ranks": []}).encode()
    ids = np.asarray(token_ids, dtype=np.int64).reshape(len(ranks), -1)
    values = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=-9999.0, neginf=-9999.0)
    values = np.maximum(values.reshape(ids.shape), -9999.0)
    return json.dumps({"token_ids": ids.tolist(), "logprobs": values.tolist(),
                       "ranks": np.asarray(ranks, dtype=np.int64).reshape(-1).tolist()}).encode()


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's path or the template itself (vLLM's rule, load_chat_template:
    a path that opens is read; one that does not and has none of ``{``, ``}``, newline is a missing
    file; anything else is the template). None/empty: the tokenizer's own."""
    if not value:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value}: looks like a file path, but it cannot be opened: "
                             f"{exc.strerror or exc}") from exc
        return value


def context_length_error(max_len: int, prompt_len: int, max_tokens: int | None) -> RequestError:
    """The 400 for a request that does not fit the context, worded as vLLM's server words it."""
    if max_tokens is None:
        return RequestError(
            f"This model's maximum context length is {max_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages.",
            param="messages",
        )
    return RequestError(
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="max_tokens",
    )


# Texts on which a fast encoder must give the tokenizer's own ids before it is trusted: special
# tokens, contractions, whitespace runs, digits, non-Latin scripts, emoji, combining marks.
ENCODER_PROBES = (
    "Hello, world! It's a test: don't panic.",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hi [/INST]</s> <|endoftext|><|eot_id|>",
    "  leading\t\ttabs\n\n\nand   spaces   \u00a0\u3000end  ",
    "def f(x):\n    return x**2  # square\n",
    "东京 Ελληνικά русский 🙂👨‍👩‍👧 e\u0301 naïve",
    "I'm, you're, we've, they'll, he'd, 'S 'x",
    "",
)


class PromptEncoder:
    """Tokenizes prompts with Go's encoder (``_govllm_shim.encode``, set by the bridge as
    ``fast``) once it has given ``encode``'s own ids on ENCODER_PROBES, else with ``encode``
    itself (the backend's tokenizer: ``encode(text, add_special_tokens)``)."""

    def __init__(self, encode: Any) -> None:
        self.encode_slow = encode
        self.fast: Any = None
        self._trusted: bool | None = None

    def _check(self) -> bool:
        fast = self.fast
        if fast is None:
            return False
        for text in ENCODER_PROBES:
            for special in (False, True):
                got = fast(text, special)
                if got is None:
                    return False
                if list(got) != list(self.encode_slow(text, special)):
                    logging.getLogger("govllm").warning(
                        "Go's prompt encoder disagrees with the tokenizer on %r: tokenizing in Python", text)
                    return False
        return True

    def __call__(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._trusted is None:
            self._trusted = self._check()
        if self._trusted:
            ids = self.fast(text, add_special_tokens)
            if ids is not None:
                return ids
        return list(self.encode_slow(text, add_special_tokens))


class EngineDeadError(Exception):
    """The engine can serve no more requests; the Go side reports 503 and may exit."""


class Backend(Protocol):
    """What the bridge needs from an engine.

    A token-id backend (vLLM, transformers) has ``submit``: it hands Go token ids only, through
    ``relay`` (set by the bridge before ``start``: ``_govllm_shim.relay``, one call per engine
    step for every request), and Go detokenizes with ``tokenizer_dir()``'s tokenizer.json,
    matches stop strings (then calls ``stop_choice``) and counts usage. A backend without
    ``submit`` yields text ``Delta``s from ``generate`` (custom backends, the scripted test
    backend).
    """

    name: str
    relay: Any

    async def start(self) -> None:
        """Load the model. Raise to fail engine start with a clear message. The bridge cancels it when
        Go shuts down during the load: blocking work belongs in a thread (asyncio.to_thread)."""

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render chat messages with the tokenizer's chat template (generation prompt added)."""

    def encode(self, prompt: str) -> list[int]:
        """Tokenize a completion prompt."""

    def max_model_len(self) -> int:
        """The context length the backend enforces."""

    def tokenizer_dir(self) -> str:
        """The directory of the tokenizer.json Go detokenizes with."""

    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str,
                     go_id: int) -> "asyncio.Future[None]":
        """Add the request's choices to the engine (RequestError for the client's mistakes). Their
        outputs go to ``relay`` with routes ``go_id << 16 | choice index``; the future resolves when
        every choice ended, or fails with EngineDeadError."""

    def stop_choice(self, go_id: int, index: int) -> None:
        """Go matched a stop string: stop that choice in the engine and relay no more of it."""

    def cancel(self, go_id: int) -> None:
        """Abort every running choice of the request and resolve its future."""

    def generate(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        """(Text backends) stream deltas. Cancelling the iterating task must abort the request."""

    def health(self) -> None:
        """Raise EngineDeadError when the engine cannot serve."""

    def num_running(self) -> int:
        """Requests the engine itself still holds (running or waiting): what an abort must free."""

    async def shutdown(self) -> None:
        """Stop the engine and free its resources."""
