"""Every use of vLLM internals below ``AsyncLLM.generate``, in one place.

govllm drives vLLM's engine-core client itself: it builds each request with AsyncLLM's own
``InputProcessor`` (validation, generation-config defaults, EOS ids), fans ``n > 1`` out into
child requests as AsyncLLM does, adds them with ``engine_core.add_request_async``, and reads the
engine's ``EngineCoreOutputs`` with ``engine_core.get_output_async`` — so AsyncLLM's output
handler, ``OutputProcessor`` and per-request queues never run, and no Python touches a token:
``_govllm_shim.relay`` reads each step's outputs in C. What that relies on, checked against the
pinned vLLM by ``tests/test_vllm_compat.py`` (which fails the day an upgrade changes any of it):

- ``AsyncLLM.input_processor.process_inputs(request_id, prompt, params, supported_tasks=...)``
  returning an ``EngineCoreRequest`` (``request_id``, ``sampling_params``), and
  ``InputProcessor.assign_request_id`` (vLLM's random suffix, so client ids may repeat);
- ``AsyncLLM.get_supported_tasks()`` (async);
- ``AsyncLLM.output_handler``: the task AsyncLLM starts to read the engine's outputs (at
  construction inside a running loop, or on its own add_request), which must not run, and
  ``AsyncLLM.errored`` reading a None handler as running;
- ``AsyncLLM.engine_core``'s ``add_request_async``, ``get_output_async``,
  ``abort_requests_async``;
- ``EngineCoreOutputs.outputs``, a list of ``EngineCoreOutput`` with ``request_id``,
  ``new_token_ids``, ``finish_reason`` (``FinishReason``, an IntEnum) and ``new_logprobs``
  (``LogprobsLists``: ``logprob_token_ids``, ``logprobs``, ``sampled_token_ranks``, one row per
  new token, column 0 the sampled token);
- child requests for ``n > 1`` named ``f"{index}_{parent_id}"`` with ``n=1`` and ``seed + index``
  (``vllm.v1.engine.parallel_sampling.ParentRequest``'s scheme, so seeded results match
  ``vllm serve``).
"""

from __future__ import annotations

import contextlib
import copy
import struct
from typing import Any

import numpy as np

# The shim's finish codes (cshim/shim.h SHIM_FINISH_*) by vLLM FinishReason name.
SHIM_FINISH_BY_NAME = {"STOP": 1, "LENGTH": 2, "ABORT": 3, "ERROR": 4, "REPETITION": 5}
SHIM_FINISH_ERROR = 4


def finish_codes() -> tuple[int, ...]:
    """relay's finish_codes: the shim code of each vLLM FinishReason value (ERROR for new ones)."""
    from vllm.v1.engine import FinishReason

    size = max(int(r) for r in FinishReason) + 1
    codes = [SHIM_FINISH_ERROR] * size
    for reason in FinishReason:
        codes[int(reason)] = SHIM_FINISH_BY_NAME.get(reason.name, SHIM_FINISH_ERROR)
    return tuple(codes)


def logprobs_meta(output: Any) -> bytes:
    """An output's new_logprobs as the delta record's meta (engine/choice.go decodeLogprobs):
    u32 rows, u32 cols, rows*cols int32 token ids, rows*cols float32 logprobs, rows int32 ranks."""
    lp = output.new_logprobs
    ids = np.ascontiguousarray(lp.logprob_token_ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids.reshape(1, -1)
    rows, cols = ids.shape
    values = np.ascontiguousarray(lp.logprobs, dtype=np.float32).reshape(rows, cols)
    ranks = np.ascontiguousarray(lp.sampled_token_ranks, dtype=np.int32).reshape(rows)
    return struct.pack("<II", rows, cols) + ids.tobytes() + values.tobytes() + ranks.tobytes()


async def supported_tasks(engine: Any) -> Any:
    return await engine.get_supported_tasks()


def make_requests(engine: Any, request_id: str, prompt: Any, params: Any, tasks: Any) -> list[Any]:
    """The EngineCoreRequests of one request: one per choice, as AsyncLLM.add_request makes them.
    Raises vLLM's validation errors (the caller maps them to 400s)."""
    processor = engine.input_processor
    request = processor.process_inputs(request_id, prompt, params, supported_tasks=tasks)
    processor.assign_request_id(request)
    sampling = request.sampling_params
    n = int(getattr(sampling, "n", 1) or 1)
    if n == 1:
        return [request]
    children = []
    for index in range(n):
        child = request if index == n - 1 else copy.copy(request)
        child_params = copy.copy(sampling)
        child_params.n = 1
        if sampling.seed is not None:
            child_params.seed = sampling.seed + index
        child.request_id = f"{index}_{request.request_id}"
        child.sampling_params = child_params
        children.append(child)
    return children


async def detach_output_handler(engine: Any) -> None:
    """Stop AsyncLLM's own output handler (it starts eagerly when AsyncLLM is built inside a running
    loop): two readers of get_output_async would each get part of the engine's steps. It is set
    back to None, which AsyncLLM.errored reads as running."""
    handler = getattr(engine, "output_handler", None)
    if handler is None:
        return
    handler.cancel()
    with contextlib.suppress(BaseException):
        await handler
    engine.output_handler = None


def core(engine: Any) -> Any:
    """The engine-core client (add_request_async, get_output_async, abort_requests_async)."""
    return engine.engine_core


# ---------------------------------------------------------------------------------------------
# The pooling runner (embeddings). With --runner pooling govllm leaves AsyncLLM's output handler
# running and embeds with the public ``AsyncLLM.encode``; what it reads beyond that:
# ``PoolingParams(task="embed", dimensions=...)``, ``PoolingRequestOutput.outputs.data`` (a
# tensor: the pooled, truncated and normalised vector), and ``ModelConfig.embedding_size``,
# ``get_vocab_size()`` and ``hf_config`` (is_matryoshka / matryoshka_dimensions).
# ---------------------------------------------------------------------------------------------


def embed_pooling_params(dimensions: int | None) -> Any:
    """vLLM's PoolingParams of one /v1/embeddings input (as its EmbeddingCompletionRequest makes them)."""
    from vllm import PoolingParams

    return PoolingParams(task="embed", dimensions=dimensions)


def pooled_data(output: Any) -> Any:
    """The vector of a finished PoolingRequestOutput."""
    return output.outputs.data


def embedding_shape(engine: Any) -> tuple[int, int, Any]:
    """(embedding size, vocabulary size, hf_config) of the served pooling model."""
    config = engine.vllm_config.model_config
    return int(config.embedding_size), int(config.get_vocab_size()), config.hf_config
