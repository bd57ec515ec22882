"""The contract between govllm.backends.hf.compat and the installed transformers.

Each private piece of transformers' continuous batching that compat.py (and the sampler through
it) relies on is asserted here with the shape it is used with, so that a transformers upgrade fails
this file loudly instead of the backend quietly misbehaving.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import queue
import re

import pytest

from govllm.backends.hf import compat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_tested_version_is_the_pinned_one():
    import transformers

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO_ROOT / "scripts" / "requirements.lock").read_text(),
                           re.M))
    assert compat.TESTED_VERSION == pins["transformers"], "update compat.TESTED_VERSION with the pin, after this file passes"
    assert transformers.__version__ == pins["transformers"], "run the contract against the pinned transformers"


def test_version_check():
    compat.check_version(compat.TESTED_VERSION)
    with pytest.raises(RuntimeError, match="not supported"):
        compat.check_version("4.57.1")
    with pytest.raises(RuntimeError, match="not supported"):
        compat.check_version("6.0.0")
    compat.check_version("5.99.0")  # newer minor: a warning only


def test_enums_and_status_values():
    from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus
    from transformers.generation.continuous_batching.requests import RequestStatus

    assert RequestStatus.FAILED.value == 4 and RequestStatus.FINISHED.value == 3
    # death_reason: a status at or above HARD_STOP means the loop fails every request
    assert (BackgroundThreadStatus.DONT_STOP, BackgroundThreadStatus.FLUSH_AND_STOP, BackgroundThreadStatus.HARD_STOP,
            BackgroundThreadStatus.STOPPED) == (0, 1, 2, 3)
    status = BackgroundThreadStatus()
    assert status.fatal_error is None and status.local_status == BackgroundThreadStatus.DONT_STOP


def test_output_router_shape():
    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    router = OutputRouter()
    with router._lock:
        assert router.result_handlers == {}
    assert isinstance(router.output_queue, queue.Queue)


def test_output_router_delivers_a_step_in_one_loop_callback():
    """The backend relays what arrives in one loop iteration at once: that is one engine step
    because the router hands a step's outputs to the loop in one call_soon_threadsafe."""
    from types import SimpleNamespace

    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    calls = []
    fake_loop = SimpleNamespace(call_soon_threadsafe=lambda fn, *args: calls.append((fn, args)))
    router = OutputRouter()
    seen = []
    for rid in ("a", "b"):
        router.result_handlers[rid] = (seen.append, fake_loop)
    outputs = [SimpleNamespace(request_id="a"), SimpleNamespace(request_id="b")]
    router.deliver_batch(outputs)
    assert len(calls) == 1 and seen == []
    fn, args = calls[0]
    fn(*args)
    assert seen == outputs


def test_generation_output_and_request_state_fields():
    from transformers.generation.continuous_batching.requests import (
        FutureRequestState, GenerationOutput, RequestState, RequestStatus,
    )

    out = GenerationOutput(request_id="r", generated_tokens=[1, 2], error=None, status=RequestStatus.FAILED)
    assert compat.read_output(out) == ([1, 2], out.is_finished(), "request failed")
    state = RequestState(request_id="r", initial_tokens=[5, 6], logit_processor_kwargs={"k": 1})
    state.generated_tokens.append(7)
    for name in ("request_id", "initial_tokens", "generated_tokens", "position_offset", "logit_processor_kwargs"):
        assert hasattr(state, name), name
    assert compat.token_history(state) == [5, 6, 7] and compat.request_id(state) == "r"
    future = FutureRequestState(state, True, {}, 1)
    assert list(compat.batch_rows([future, FutureRequestState(state, False, {}, 1)], "k")) == [
        (state, 1, state.position_offset)]


def test_continuous_batching_config_fields():
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    used = {"page_size", "num_blocks", "max_batch_tokens", "max_memory_percent", "max_requests_per_batch", "seed",
            "return_logprobs", "allow_block_sharing", "use_cuda_graph", "use_async_batching", "default_compile_level",
            "scheduler_type", "max_blocks_per_request", "auto_switch_to_flash"}
    assert used <= fields, used - fields
    assert compat.continuous_batching_config({"page_size": 16, "no_such_field": 1}).page_size == 16


def test_memory_probe_signature():
    from transformers.generation.continuous_batching import cache as cb_cache

    probe = cb_cache.get_device_and_memory_breakdown
    assert _params(probe) == []
    with compat.host_memory_probe("cpu"):
        device, total, reserved, allocated = cb_cache.get_device_and_memory_breakdown()
        assert device.type == "cpu" and total > 0 and 0 <= reserved <= total and allocated == reserved
    assert cb_cache.get_device_and_memory_breakdown is probe


def test_logits_processor_list_interface():
    base = compat.logits_processor_list_base()
    assert _params(base.__init__)[:4] == ["self", "logits_processor", "per_request_processors",
                                          "drop_unsupported_processors"]
    assert _params(base.prepare_tensor_args) == ["self", "requests_in_batch", "arg_storage"]
    assert _params(base.__call__) == ["self", "input_ids", "scores", "logits_processor_args"]
    assert _params(base.fill_defaults) == ["self", "int32_tensor"]
    for name in ("check_kwargs", "clear"):
        assert callable(getattr(base, name)), name
    from transformers.generation.logits_process import LogitsProcessorList

    instance = base(LogitsProcessorList())
    for name in ("tensors_required", "supported_keys", "ignored_keys", "do_processing"):
        assert hasattr(instance, name), name


def test_manager_public_signatures():
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager, ContinuousMixin

    manager = ContinuousBatchingManager
    assert {"generation_config", "continuous_batching_config"} <= set(_params(ContinuousMixin.init_continuous_batching))
    add = inspect.signature(manager.add_request).parameters
    assert {"input_ids", "request_id", "max_new_tokens", "streaming", "eos_token_id"} <= set(add)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in add.values())  # logit_processor_kwargs
    assert _params(manager.register_result_handler) == ["self", "request_id", "callback"]
    assert _params(manager.cancel_request) == ["self", "request_id"]
    assert {"block", "timeout"} <= set(_params(manager.stop))
    for name in ("warmup", "start", "destroy", "is_running"):
        assert callable(getattr(manager, name)), name


def test_live_manager_internals(backend):
    """What compat reads of a started manager: router, thread status, batch processor, scheduler,
    cache, model runner, and the sampler installed as the manager's logits processor."""
    from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus

    manager = backend.manager
    assert isinstance(manager.background_thread_status, BackgroundThreadStatus)
    assert compat.death_reason(manager, closing=False) is None
    processor = manager.batch_processor
    assert processor.logit_processor is manager.logit_processor
    assert type(manager.logit_processor).__name__ == "PerRequestSampler"
    scheduler = processor.scheduler
    assert isinstance(scheduler.active_requests, dict) and isinstance(scheduler.waiting_requests, dict)
    assert compat.held_request_ids(manager) == set()
    assert compat.cache_blocks(processor) == backend._num_blocks > 0
    runner = compat.model_runner(processor)
    assert compat.can_toggle_cuda_graphs(runner)
    assert compat.cuda_graph_flags(runner) == (runner.use_cuda_graph_varlen, runner.use_cuda_graph_decode)
    compat.drop_handler(manager, "no-such-request")
    compat.drain_orphans(manager)


def test_xgrammar_bitmask_and_matcher(tokenizer):
    """The xgrammar pieces the sampler uses (compat's bitmask helpers, GrammarMatcher's accept /
    rollback / reset / terminate / stop tokens) behave as relied on with the pinned xgrammar."""
    import torch
    import xgrammar as xgr

    from govllm import structured

    assert structured.xgrammar_version() == structured.TESTED_XGRAMMAR
    vocab = 49152
    bitmask = compat.allocate_bitmask(3, vocab)
    assert bitmask.shape == (3, (vocab + 31) // 32) and bitmask.dtype == torch.int32
    assert bool((bitmask == -1).all()), "a fresh bitmask allows every token"
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    compiled = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_grammar('root ::= "yes" | "no"')
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=[tokenizer.eos_token_id])
    matcher.fill_next_token_bitmask(bitmask, 1)  # row 1 only
    logits = torch.zeros(3, vocab)
    compat.apply_bitmask(logits, bitmask, [1])
    assert bool((logits[0] == 0).all()) and bool((logits[2] == 0).all()), "rows not listed are untouched"
    allowed = (logits[1] == 0).nonzero().view(-1).tolist()
    assert allowed and all("yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t]))
                           for t in allowed)
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert all(matcher.accept_token(t) for t in yes) and matcher.is_completed()
    compat.rollback(matcher, len(yes))
    assert not matcher.is_completed()
    assert all(matcher.accept_token(t) for t in yes)
    assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()
    matcher.reset()
    assert not matcher.is_terminated() and not matcher.accept_token(tokenizer.eos_token_id)


def test_engine_stats_of_a_live_manager(backend):
    """/metrics' figures from transformers: the scheduler's running and waiting requests and the
    paged cache's usage (PagedAttentionCache.compute_free_capacity); nothing else is reported."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    assert "relative" in _params(PagedAttentionCache.compute_free_capacity)
    manager = backend.manager
    assert compat.scheduler_load(manager) == (0, 0)
    usage = compat.kv_cache_usage(manager)
    assert usage is not None and 0.0 <= usage <= 1.0
    assert compat.scheduler_load(None) is None and compat.kv_cache_usage(None) is None
    snap = backend.engine_stats()
    assert snap["gauges"] == {"num_requests_running": 0.0, "num_requests_waiting": 0.0, "kv_cache_usage_perc": usage}
    assert snap["counters"] == {} and snap["histograms"] == {} and snap["info"] == {}
