"""engine_stats.EngineStats (the figures /metrics serves under vLLM's names) and the vllm backend's
per-step feeding of it from vLLM's own EngineCoreOutputs (no engine started)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from govllm.engine_stats import REQUEST_LATENCY_BUCKETS, EngineStats, Histogram


def test_histogram_buckets_and_snapshot():
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.5, 7.0):
        h.observe(v)
    # per-bucket counts (le semantics: 1.0 falls in the first bucket); 7.0 only in +Inf
    assert h.snapshot() == {"buckets": [1.0, 2.0, 5.0], "counts": [2, 1, 0], "sum": 10.0, "count": 4}


def test_phase_times_as_vllm_computes_them():
    st = EngineStats()
    st.queued("a", 10.0)
    st.scheduled("a", 10.5)
    st.first_output("a", 11.0)
    st.preempted("a")
    st.scheduled("a", 11.5)  # rescheduled after the preemption: not the scheduled time
    st.first_output("a", 12.0)  # not the first output
    st.finished("a", 14.0)
    snap = st.snapshot()
    hist = snap["histograms"]
    assert math.isclose(hist["request_queue_time_seconds"]["sum"], 0.5)
    assert math.isclose(hist["request_prefill_time_seconds"]["sum"], 0.5)
    assert math.isclose(hist["request_decode_time_seconds"]["sum"], 3.0)
    assert math.isclose(hist["request_inference_time_seconds"]["sum"], 3.5)
    assert all(h["count"] == 1 for h in hist.values())
    assert hist["request_queue_time_seconds"]["buckets"] == list(REQUEST_LATENCY_BUCKETS)
    assert snap["counters"] == {"num_preemptions": 1.0}
    assert st.open_requests() == 0
    st.finished("a", 15.0)  # a second finish (an abort output after Go's stop) observes nothing
    assert st.snapshot()["histograms"]["request_queue_time_seconds"]["count"] == 1


def test_scheduler_gauges_and_counters_accumulate():
    st = EngineStats()
    assert st.snapshot() == {"gauges": {}, "counters": {}, "histograms": {}, "info": {}}  # absent, not zero
    st.scheduler(2, 1, 0.5, 10, 4)
    st.scheduler(1, 0, 0.25, 6, 6)
    snap = st.snapshot()
    assert snap["gauges"] == {"num_requests_running": 1.0, "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.25}
    assert snap["counters"] == {"prefix_cache_queries": 16.0, "prefix_cache_hits": 10.0}
    st.scheduler(0, 3, None)  # a backend without KV figures leaves the gauge as it was
    assert "kv_cache_usage_perc" in st.snapshot()["gauges"]
    assert "kv_cache_usage_perc" not in EngineStats().snapshot()["gauges"]


def test_forget_finishes_as_of_the_latest_step():
    st = EngineStats()
    st.queued("b", 1.0)
    st.scheduled("b", 2.0)
    st.first_output("b", 3.0)
    st.iteration(5.0, 4)
    st.forget("b")
    hist = st.snapshot()["histograms"]
    assert math.isclose(hist["request_inference_time_seconds"]["sum"], 3.0)
    assert hist["iteration_tokens_total"]["count"] == 1 and hist["iteration_tokens_total"]["sum"] == 4
    st.queued("never-scheduled", 1.0)
    st.forget("never-scheduled")  # aborted while waiting: no phase times, nothing kept
    assert st.open_requests() == 0 and st.snapshot()["histograms"]["request_queue_time_seconds"]["count"] == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_step_stats_from_engine_core_outputs():
    """VLLMBackend._step_stats on vLLM's own structs, as the pump gets them, through the relay's
    noted list (the Python relay of the tests, which notes as shim.c does)."""
    from vllm.v1.engine import EngineCoreEvent, EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.metrics.stats import PrefillStats, PrefixCacheStats, SchedulerStats

    from govllm.backends import vllm_compat, vllm_engine
    from helpers import FakeRelay

    backend = vllm_engine.VLLMBackend.__new__(vllm_engine.VLLMBackend)
    backend.stats = EngineStats()
    routes = {"r1": 1 << 16, "gone": 2 << 16}
    relay = FakeRelay()
    prefill = PrefillStats()
    prefill.set(num_prompt_tokens=12, num_local_cached_tokens=0, num_external_cached_tokens=0)

    def step(ts, outs, running, waiting, usage, queries, hits):
        outputs = EngineCoreOutputs(outputs=outs, timestamp=ts, scheduler_stats=SchedulerStats(
            num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=usage,
            prefix_cache_stats=PrefixCacheStats(queries=queries, hits=hits)))
        noted: list = []
        for rid in relay(outputs.outputs, routes, vllm_compat.finish_codes(), None, None, noted):
            routes.pop(rid)
        backend._step_stats(outputs, noted, routes)
        return noted

    first = EngineCoreOutput(request_id="r1", new_token_ids=[5], prefill_stats=prefill, events=[
        EngineCoreEvent(EngineCoreEventType.QUEUED, 100.0), EngineCoreEvent(EngineCoreEventType.SCHEDULED, 100.2)])
    assert len(step(100.4, [first], 1, 0, 0.1, 12, 0)) == 1
    # decode steps: nothing noted (no events, no finish), so no Python per token
    assert step(100.5, [EngineCoreOutput(request_id="r1", new_token_ids=[6])], 1, 0, 0.1, 0, 0) == []
    assert step(101.0, [EngineCoreOutput(request_id="r1", new_token_ids=[7], finish_reason=FinishReason.LENGTH)],
                0, 0, 0.0, 0, 0)
    snap = backend.stats.snapshot()
    assert snap["gauges"] == {"num_requests_running": 0.0, "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
    assert snap["counters"] == {"prefix_cache_queries": 12.0, "prefix_cache_hits": 0.0}
    h = snap["histograms"]
    assert math.isclose(h["request_queue_time_seconds"]["sum"], 0.2)
    assert math.isclose(h["request_prefill_time_seconds"]["sum"], 0.2)
    assert math.isclose(h["request_decode_time_seconds"]["sum"], 0.6)
    assert math.isclose(h["request_inference_time_seconds"]["sum"], 0.8)
    assert h["iteration_tokens_total"]["count"] == 3 and h["iteration_tokens_total"]["sum"] == 13 + 1 + 1
    # a request Go already dropped: its late events are ignored, nothing is kept for it
    routes.pop("gone")
    late = EngineCoreOutput(request_id="gone", new_token_ids=[1], events=[
        EngineCoreEvent(EngineCoreEventType.SCHEDULED, 102.0)])
    step(102.0, [late], 0, 0, 0.0, 0, 0)
    assert backend.stats.open_requests() == 0
