"""Every use of transformers' continuous-batching internals, in one place.

The backend relies on private parts of ``transformers.generation.continuous_batching`` (the output
router's lock and handler table, the background thread's status, the model runner's CUDA-graph
flags, the cache's memory probe, the request state the logits processor sees). They change
between releases without notice, so they are touched only here, and
``engine/python/tests/test_hf_compat.py`` asserts each one against the pinned version
(``scripts/requirements.lock``). ``check_version`` refuses releases older than
``MIN_VERSION`` and warns outside the tested minor release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ... import host

log = logging.getLogger("govllm.transformers")

# The release pinned in scripts/requirements.lock: the contract test runs against it.
TESTED_VERSION = "5.19.0"
# Older releases lack the pieces used here (paged attention under the manager, the logits
# processor list that takes per-request tensors).
MIN_VERSION = (5, 17)


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise RuntimeError(f"cannot parse the transformers version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_version(version: str) -> None:
    """Raise for a transformers the backend cannot run on; warn for one it was not tested with."""
    have = _major_minor(version)
    tested = _major_minor(TESTED_VERSION)
    if have < MIN_VERSION or have[0] != tested[0]:
        raise RuntimeError(
            f"transformers {version} is not supported by the transformers backend (it needs "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]} to {tested[0]}.x and is tested with {TESTED_VERSION}): "
            f"install transformers=={TESTED_VERSION} (scripts/requirements.lock)"
        )
    if have != tested:
        log.warning("transformers %s is not the tested %s: the backend uses private continuous-batching "
                    "internals that may have changed (engine/python/tests/test_hf_compat.py checks them)",
                    version, TESTED_VERSION)


# --------------------------------------------------------------------------------------- classes


def logits_processor_list_base() -> type:
    """The class the manager calls for logits processing (``PerRequestSampler`` subclasses it)."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    return ContinuousBatchingLogitsProcessorList


def continuous_batching_config(kwargs: dict[str, Any]) -> Any:
    """A ``ContinuousBatchingConfig`` from ``kwargs``, dropping the fields this release does not have.

    ``page_size`` is passed as ``block_size`` to releases before 5.17 named it so.
    """
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    kwargs = dict(kwargs)
    if "page_size" in kwargs and "page_size" not in fields:
        kwargs["block_size"] = kwargs.pop("page_size")
    dropped = sorted(k for k in kwargs if k not in fields)
    if dropped:
        log.debug("ContinuousBatchingConfig has no %s: ignored", ", ".join(dropped))
    return ContinuousBatchingConfig(**{k: v for k, v in kwargs.items() if k in fields})


# --------------------------------------------------------------------------------------- manager


def install_logits_processor(manager: Any, processor: Any) -> None:
    """Replace the manager's logits processing (before ``warmup`` builds the batch processor)."""
    manager.logit_processor = processor


def warmup(manager: Any, device: str) -> Any:
    """Create the cache and batch processor (capturing CUDA graphs if on); returns the batch processor."""
    import torch

    scope = torch.cuda.device(torch.device(device)) if device.startswith("cuda") else contextlib.nullcontext()
    with scope, host_memory_probe(device):
        manager.warmup()
    return manager.batch_processor


def model_runner(processor: Any) -> Any:
    return getattr(processor, "model_runner", None)


def cache_blocks(processor: Any) -> int:
    return int(getattr(processor.cache, "num_blocks", 0) or 0)


def cuda_graph_flags(runner: Any) -> tuple[bool, bool]:
    """The runner's (varlen, decode) CUDA-graph switches (False where it has none)."""
    return (bool(getattr(runner, "use_cuda_graph_varlen", False)),
            bool(getattr(runner, "use_cuda_graph_decode", False)))


def can_toggle_cuda_graphs(runner: Any) -> bool:
    return runner is not None and hasattr(runner, "use_cuda_graph_varlen") and hasattr(runner, "use_cuda_graph_decode")


def set_cuda_graph_flags(runner: Any, varlen: bool, decode: bool) -> None:
    runner.use_cuda_graph_varlen = varlen
    runner.use_cuda_graph_decode = decode


def drop_handler(manager: Any, request_id: str) -> None:
    """Forget the result handler of ``request_id`` (its outputs then go to the orphan queue)."""
    router = getattr(manager, "output_router", None)
    if router is None:
        return
    with router._lock:
        router.result_handlers.pop(request_id, None)


def drain_orphans(manager: Any) -> None:
    """Drop outputs that reached the shared queue because their handler was already removed.

    Nothing reads that queue: a cancelled request whose step was running would leak an output or two.
    """
    router = getattr(manager, "output_router", None)
    orphans = getattr(router, "output_queue", None)
    if orphans is None:
        return
    with contextlib.suppress(Exception):
        while not orphans.empty():
            orphans.get_nowait()


def held_request_ids(manager: Any) -> set[str]:
    """Engine request ids the manager still holds: result handlers, running and waiting requests."""
    if manager is None:
        return set()
    router = manager.output_router
    with router._lock:
        held = set(router.result_handlers)
    processor = manager.batch_processor
    if processor is not None:
        scheduler = processor.scheduler
        held |= set(scheduler.active_requests) | set(scheduler.waiting_requests)
    return held


def scheduler_load(manager: Any) -> tuple[int, int] | None:
    """(running, waiting) requests of the manager's scheduler (its active and waiting requests),
    or None before the batch processor exists. Read from the loop thread: len() of a dict the
    generation thread mutates is atomic under the GIL."""
    processor = getattr(manager, "batch_processor", None) if manager is not None else None
    if processor is None:
        return None
    scheduler = processor.scheduler
    return len(scheduler.active_requests), len(scheduler.waiting_requests)


def kv_cache_usage(manager: Any) -> float | None:
    """The used fraction of the paged KV cache (1 - PagedAttentionCache.compute_free_capacity()),
    or None before the batch processor exists."""
    processor = getattr(manager, "batch_processor", None) if manager is not None else None
    if processor is None:
        return None
    return min(1.0, max(0.0, 1.0 - float(processor.cache.compute_free_capacity(relative=True))))


def death_reason(manager: Any, closing: bool) -> str | None:
    """Why the manager's generation loop can serve no more, or None while it can."""
    from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus

    if manager is None:
        return None
    status = getattr(manager, "background_thread_status", None)
    fatal = getattr(status, "fatal_error", None)
    if fatal is not None:
        return f"the generation loop failed: {type(fatal).__name__}: {fatal}"
    if getattr(status, "local_status", 0) >= BackgroundThreadStatus.HARD_STOP and not closing:
        # The loop fails every request before it records the error (the backend never hard-stops it).
        return "the generation loop is failing"
    if not manager.is_running():
        return "the generation loop exited"
    return None


# --------------------------------------------------------------------------------------- outputs, requests


def read_output(out: Any) -> tuple[list[int], bool, str | None]:
    """A ``GenerationOutput``'s (generated tokens, finished, error); error is set for a failed request."""
    from transformers.generation.continuous_batching.requests import RequestStatus

    error = out.error
    if error is None and out.status == RequestStatus.FAILED:
        error = "request failed"
    return out.generated_tokens, out.is_finished(), None if error is None else str(error)


def batch_rows(requests_in_batch: Iterable[Any], key: str) -> Iterator[tuple[Any, Any, int]]:
    """(state, our kwarg or None, position) of each request that predicts a token in this batch, in row order."""
    for request in requests_in_batch:
        if not request.has_new_token:
            continue
        state = request.state
        kwargs = state.logit_processor_kwargs
        yield state, kwargs.get(key) if kwargs else None, state.position_offset


def batch_segments(requests_in_batch: Iterable[Any], key: str) -> list[tuple[int, int]]:
    """(query tokens, LoRA adapter index) of every request in the step, in the order the batch packs
    their tokens (``ContinuousBatchProcessor.prepare_batch_tensors``: ``query_length`` each)."""
    out = []
    for request in requests_in_batch:
        kwargs = request.state.logit_processor_kwargs
        params = kwargs.get(key) if kwargs else None
        out.append((int(request.query_length), int(getattr(params, "adapter", 0) or 0)))
    return out


def request_id(state: Any) -> str:
    return state.request_id


def token_history(state: Any) -> list[int]:
    """A request's tokens so far: the prompt, plus earlier outputs after a soft reset, then its outputs."""
    return list(state.initial_tokens) + list(state.generated_tokens)


# --------------------------------------------------------------------------------------- memory probe


@contextlib.contextmanager
def host_memory_probe(device: str) -> Iterator[None]:
    """Make the cache's memory probe report host memory while a CPU cache is sized.

    transformers sizes its cache from ``get_device_and_memory_breakdown()``, which reports CUDA
    memory whenever CUDA is visible. The probe is swapped only for the cache creation, only on CPU.
    """
    if not device.startswith("cpu"):
        yield
        return
    from transformers.generation.continuous_batching import cache as cb_cache

    original = getattr(cb_cache, "get_device_and_memory_breakdown", None)
    if original is None:
        yield
        return

    def probe() -> tuple[Any, int, int, int]:
        import torch

        total, free = host.memory()
        used = max(0, total - free)
        return torch.device("cpu"), total, used, used

    cb_cache.get_device_and_memory_breakdown = probe
    try:
        yield
    finally:
        cb_cache.get_device_and_memory_breakdown = original


# --------------------------------------------------------------------------------------- xgrammar
# The token-mask side of structured outputs (compiling is govllm/structured.py). Public xgrammar API,
# gathered here so that test_hf_compat.py pins its shape and semantics against xgrammar 0.2.8.


def allocate_bitmask(rows: int, vocab: int) -> Any:
    """An all-allowed int32 token bitmask [rows, ceil(vocab / 32)] on the host."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab)


def apply_bitmask(logits: Any, bitmask: Any, rows: list[int]) -> None:
    """logits[r, t] = -inf for each row r of ``rows`` whose bitmask row disallows t (in place)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.size(-1), indices=rows)


def rollback(matcher: Any, tokens: int) -> None:
    """Undo the last ``tokens`` tokens a GrammarMatcher accepted."""
    matcher.rollback(tokens)
