"""Helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from govllm.backend import Delta, SamplingParams


def collect(loop, backend, prompt, sampling, request_id):
    return loop.run_until_complete(_collect(backend, prompt, sampling, request_id))


async def _collect(backend, prompt, sampling, request_id) -> dict[int, dict]:
    """Runs one request; returns {index: {"ids", "text", "finish", "deltas"}}."""
    out: dict[int, dict] = {}
    async for d in backend.generate(prompt, sampling, request_id):
        assert isinstance(d, Delta)
        c = out.setdefault(d.index, {"ids": [], "text": "", "finish": None, "deltas": 0})
        assert c["finish"] is None, "delta after the finishing one"
        assert d.token_ids or d.text or d.finish_reason, "empty delta"
        c["ids"] += d.token_ids
        c["text"] += d.text
        c["finish"] = d.finish_reason
        c["deltas"] += 1
    return out


def greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def gather_watching(loop, coros: list[Coroutine[Any, Any, Any]], probe: Callable[[], int]) -> tuple[list, int]:
    """Runs coros together on loop while sampling probe() every 5 ms (e.g. the scheduler's running
    or waiting count); returns their results and the largest value probe gave."""
    peak = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, probe())
            await asyncio.sleep(0.005)

    async def together() -> list:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        try:
            return await asyncio.gather(*coros)
        finally:
            done.set()
            await watcher

    return loop.run_until_complete(together()), peak
