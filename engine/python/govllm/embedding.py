"""Embeddings: CMD_EMBED from Go, answered with one EV_EMBEDDING (engine/embed.go).

The command is JSON: ``{"request_id", "inputs": [{"text"} | {"token_ids"}], "dimensions"}``.
Texts are tokenized here with the backend's tokenizer (special tokens added, as vLLM's
embeddings route does); every input must fit the context and use ids of the vocabulary;
``dimensions`` must be one the model declares (``is_matryoshka`` / ``matryoshka_dimensions``
in its config, vLLM's rule and wording). The backend's ``embed(token_ids, dimensions,
request_id)`` pools one vector per input (vLLM's pooling runner, or transformers' ``AutoModel``
with the model's sentence-transformers pooling config).

The reply's meta: a little-endian u32 header length, the JSON header (``count``, ``dim``,
``prompt_tokens``, or only ``error``), then ``count * dim`` little-endian float32s. An
embedding request cancelled by Go (CMD_ABORT: its caller went away) sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import struct
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from .backend import EngineDeadError, RequestError

log = logging.getLogger("govllm")

RUNNER_POOLING = "pooling"
RUNNER_GENERATE = "generate"
GENERATE_RUNNER_MESSAGE = ("This model is served with the generate runner, which makes no embeddings: start the "
                           "server with --runner pooling (and an embedding model) to serve /v1/embeddings.")
POOLING_RUNNER_MESSAGE = ("This model is served with the pooling runner (--runner pooling), which only makes "
                          "embeddings: use /v1/embeddings, or start the server with --runner generate for "
                          "chat and completions.")


@dataclasses.dataclass
class EmbeddingInfo:
    """What a pooling backend knows of its vectors."""

    size: int  # the embedding's length
    vocab_size: int
    matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None


@dataclasses.dataclass
class EmbedCommand:
    request_id: str
    inputs: list[str | list[int]]
    dimensions: int | None


def matryoshka_from_config(config: Any) -> tuple[bool, list[int] | None]:
    """(is_matryoshka, matryoshka_dimensions) of a model config (object or dict), as vLLM reads them."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    dims = get("matryoshka_dimensions", None)
    dims = [int(d) for d in dims] if dims else None
    return bool(dims) or bool(get("is_matryoshka", False)), dims


def parse_command(data: bytes) -> EmbedCommand:
    try:
        cmd = json.loads(data)
        raw = cmd["inputs"]
        inputs: list[str | list[int]] = []
        for item in raw:
            if item.get("token_ids"):
                inputs.append([int(t) for t in item["token_ids"]])
            else:
                inputs.append(str(item.get("text") or ""))
        dims = cmd.get("dimensions")
        return EmbedCommand(str(cmd.get("request_id") or "embd"), inputs, None if dims is None else int(dims))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RequestError(f"malformed embedding request: {exc}", param="input") from exc


def check_dimensions(dimensions: int | None, info: EmbeddingInfo, model_name: str) -> None:
    """vLLM's rule (PoolingParams), in its words, with param "dimensions"."""
    if dimensions is None:
        return
    if not info.matryoshka:
        raise RequestError(f"Model {model_name!r} does not support Matryoshka embeddings; dimensions must be "
                           f"unset (received dimensions={dimensions}).", param="dimensions")
    if not 1 <= dimensions <= info.size:
        raise RequestError(f"Model {model_name!r} only supports dimensions in range [1, {info.size}], "
                           f"got {dimensions}.", param="dimensions")
    if info.matryoshka_dimensions is not None and dimensions not in info.matryoshka_dimensions:
        raise RequestError(f"Model {model_name!r} only supports Matryoshka dimensions "
                           f"{info.matryoshka_dimensions}, got {dimensions}.", param="dimensions")


def token_inputs(inputs: Sequence[str | list[int]], encode: Callable[[str], list[int]], max_len: int,
                 vocab_size: int) -> list[list[int]]:
    """Each input as token ids; RequestError for an empty, too long or out-of-vocabulary one."""
    out: list[list[int]] = []
    for i, item in enumerate(inputs):
        ids = encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise RequestError(f"input[{i}] is empty.", param="input")
        if max_len and len(ids) > max_len:
            # vLLM's wording (renderers/params.py _token_len_check).
            raise RequestError(f"This model's maximum context length is {max_len} tokens. However, your prompt "
                               f"contains {len(ids)} input tokens, which exceeds this limit even without any "
                               "output tokens. Please reduce the length of the input prompt.", param="input")
        if vocab_size:
            bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
            if bad is not None:
                raise RequestError(f"input[{i}] has token id {bad}, outside the vocabulary [0, {vocab_size}).",
                                   param="input")
        out.append(ids)
    return out


def pack(vectors: Sequence[Any], prompt_tokens: int) -> bytes:
    """EV_EMBEDDING's meta for the vectors (one row per input, equal lengths)."""
    rows = np.stack([np.asarray(v, dtype="<f4").reshape(-1) for v in vectors]) if vectors else \
        np.zeros((0, 0), dtype="<f4")
    header = json.dumps({"count": int(rows.shape[0]), "dim": int(rows.shape[1]), "prompt_tokens": prompt_tokens},
                        separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + np.ascontiguousarray(rows, dtype="<f4").tobytes()


def pack_error(status: int, type_: str, message: str, param: str | None) -> bytes:
    header = json.dumps({"error": {"status": status, "type": type_, "message": message, "param": param or ""}},
                        separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header


async def embed(backend: Any, data: bytes, go_id: int, model_name: str) -> bytes:
    """The EV_EMBEDDING meta answering one CMD_EMBED (errors included); CancelledError propagates."""
    try:
        if getattr(backend, "runner", RUNNER_GENERATE) != RUNNER_POOLING or not hasattr(backend, "embed"):
            raise RequestError(GENERATE_RUNNER_MESSAGE, param="model")
        cmd = parse_command(data)
        if not cmd.inputs:
            raise RequestError("input must not be empty.", param="input")
        info: EmbeddingInfo = backend.embedding_info()
        check_dimensions(cmd.dimensions, info, model_name)
        ids = token_inputs(cmd.inputs, backend.encode, backend.max_model_len(), info.vocab_size)
        vectors = await backend.embed(ids, cmd.dimensions, f"{cmd.request_id}-{go_id}")
        return pack(vectors, sum(len(x) for x in ids))
    except RequestError as exc:
        log.debug("embedding request %d refused: %s", go_id, exc)
        return pack_error(exc.status, exc.type, str(exc), exc.param)
    except EngineDeadError as exc:
        log.warning("embedding request %d: the engine died: %s", go_id, exc)
        return pack_error(503, "EngineDeadError", str(exc), None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("embedding request %d failed:\n%s", go_id, traceback.format_exc())
        return pack_error(500, "InternalServerError", f"{type(exc).__name__}: {exc}", None)


def start(bridge: Any, go_id: int, data: bytes, emit: Callable[[int, bytes], None]) -> None:
    """Serve a CMD_EMBED as a task of the bridge's request table (CMD_ABORT and shutdown cancel it)."""
    if not bridge.ready or bridge.shutting_down:
        state = "shutting down" if bridge.shutting_down else "starting"
        emit(go_id, pack_error(503, "ServiceUnavailableError", f"the engine is {state}", None))
        return
    name = bridge.cfg.served_model_name or bridge.cfg.model

    async def serve() -> None:
        meta = await embed(bridge.backend, data, go_id, name)
        try:
            emit(go_id, meta)
        except ValueError as exc:  # larger than the shim's event buffer
            emit(go_id, pack_error(400, "BadRequestError", f"the embeddings of this request are too large to "
                                   f"return at once ({exc}): send fewer inputs per request", "input"))

    task = bridge.loop.create_task(serve())
    bridge.tasks[go_id] = task
    task.add_done_callback(lambda t: bridge.tasks.pop(go_id, None))
