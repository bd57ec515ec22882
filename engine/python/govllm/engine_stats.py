"""The engine's own figures for /metrics under vLLM's names, aggregated per engine step.

A backend feeds an ``EngineStats`` once per engine step (the scheduler's gauges and counters) and
once per state change of a request (queued, scheduled, preempted, finished); ``snapshot()`` is the
JSON the bridge answers a stats command with (``llm.EngineStats`` in Go, which serves it). Nothing
here runs per token. Per-request times follow vLLM's ``IterationStats.update_from_finished_request``
(vllm/v1/metrics/stats.py): queue = scheduled - queued, prefill = first token - scheduled,
decode = last token - first token, inference = last token - scheduled, all on the engine's
monotonic clock. A figure the backend never fed is left out of the snapshot (its series stays
absent) rather than reported as zero.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

# vLLM's default buckets (vllm/v1/metrics/buckets.py), so dashboards built for vLLM read alike.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# The per-request phase histograms (vLLM names less "vllm:").
PHASES = ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
          "request_inference_time_seconds")


class Histogram:
    """A cumulative histogram: per-bucket counts (the last one is +Inf), sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.bounds), "counts": self.counts[:len(self.bounds)], "sum": self.sum,
                "count": self.count}


@dataclasses.dataclass
class _Timing:
    """One engine request's timestamps (the engine's monotonic clock; 0: not seen)."""

    queued: float = 0.0
    scheduled: float = 0.0
    first_token: float = 0.0


class EngineStats:
    """The aggregate a backend feeds and the bridge snapshots."""

    def __init__(self) -> None:
        self.gauges: dict[str, float] = {}
        self.counters: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}
        self.info: dict[str, dict[str, str]] = {}
        self._timings: dict[str, _Timing] = {}
        self.last_step = 0.0  # the timestamp of the latest step

    # ------------------------------------------------------------------ per step

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float | None,
                  prefix_queries: int | None = None, prefix_hits: int | None = None) -> None:
        """The scheduler's view after a step: gauges set, prefix-cache counters added."""
        self.gauges["num_requests_running"] = float(running)
        self.gauges["num_requests_waiting"] = float(waiting)
        if kv_cache_usage is not None:
            self.gauges["kv_cache_usage_perc"] = float(kv_cache_usage)
        if prefix_queries is not None:
            self.add("prefix_cache_queries", prefix_queries)
        if prefix_hits is not None:
            self.add("prefix_cache_hits", prefix_hits)

    def iteration(self, timestamp: float, tokens: int) -> None:
        """One engine step that processed tokens (prompt tokens computed plus generated tokens)."""
        self.last_step = timestamp
        self._histogram("iteration_tokens_total", ITERATION_TOKENS_BUCKETS).observe(tokens)

    def declare(self, name: str) -> None:
        """A histogram the backend supplies, exported (empty) before its first observation."""
        self._histogram(name, ITERATION_TOKENS_BUCKETS if name == "iteration_tokens_total" else REQUEST_LATENCY_BUCKETS)

    def add(self, name: str, value: float) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + float(value)

    # ------------------------------------------------------------------ per request state change

    def queued(self, request_id: str, timestamp: float) -> None:
        self._timings.setdefault(request_id, _Timing()).queued = timestamp

    def scheduled(self, request_id: str, timestamp: float) -> None:
        t = self._timings.setdefault(request_id, _Timing())
        if t.scheduled == 0.0:  # a preempted request's rescheduling does not count (as vLLM)
            t.scheduled = timestamp

    def preempted(self, request_id: str) -> None:
        self.add("num_preemptions", 1)

    def first_output(self, request_id: str, timestamp: float) -> None:
        """The step that produced the request's first output (its first token)."""
        t = self._timings.get(request_id)
        if t is not None and t.first_token == 0.0:
            t.first_token = timestamp

    def finished(self, request_id: str, timestamp: float) -> None:
        """The request ended in the step at timestamp (its last token): its phase times observed."""
        t = self._timings.pop(request_id, None)
        if t is None or t.scheduled == 0.0:
            return  # never scheduled (aborted while waiting), or already finished
        first = t.first_token or timestamp
        if t.queued:
            self._histogram(PHASES[0], REQUEST_LATENCY_BUCKETS).observe(max(0.0, t.scheduled - t.queued))
        self._histogram(PHASES[1], REQUEST_LATENCY_BUCKETS).observe(max(0.0, first - t.scheduled))
        self._histogram(PHASES[2], REQUEST_LATENCY_BUCKETS).observe(max(0.0, timestamp - first))
        self._histogram(PHASES[3], REQUEST_LATENCY_BUCKETS).observe(max(0.0, timestamp - t.scheduled))

    def forget(self, request_id: str) -> None:
        """A request that ended without the engine saying so (aborted by govllm): finished as of
        the latest step."""
        if request_id in self._timings:
            self.finished(request_id, self.last_step or 0.0)

    def open_requests(self) -> int:
        return len(self._timings)

    # ------------------------------------------------------------------ the snapshot

    def _histogram(self, name: str, bounds: tuple[float, ...]) -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(bounds)
        return h

    def snapshot(self) -> dict[str, Any]:
        """llm.EngineStats' JSON."""
        return {
            "gauges": dict(self.gauges),
            "counters": dict(self.counters),
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
            "info": {name: dict(labels) for name, labels in self.info.items()},
        }
