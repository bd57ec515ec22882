"""Helpers shared by the backend tests."""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import operator
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from govllm.backend import SamplingParams


FINISH_NAMES = {1: "stop", 2: "length", 3: "abort", 4: "error", 5: "stop"}


def relay_outputs(outputs: list[Any], routes: dict[str, int], finish_codes: tuple[int, ...], logprobs_meta: Any,
                  record: Callable[[dict[str, Any]], None], prompt_hook: Any = None,
                  noted: list[Any] | None = None) -> list[str]:
    """What shim.c's relay does, in Python: record(...) for each routed output as Go would receive
    it ({"go_id", "index", "ids", "finish", "meta"}, or {"go_id", "prompt_logprobs"} for what
    prompt_hook returns); the finished request ids returned. With noted, the outputs with events
    or a finish reason are appended to it, routed or not."""
    finished = []
    for out in outputs:
        if noted is not None and (out.events is not None or out.finish_reason is not None):
            noted.append(out)
        key = routes.get(out.request_id)
        if key is None:
            continue
        if prompt_hook is not None and getattr(out, "new_prompt_logprobs_tensors", None) is not None:
            pmeta = prompt_hook(out, key)
            if pmeta is not None:
                record({"go_id": key >> 16, "prompt_logprobs": json.loads(pmeta)})
        reason = out.finish_reason
        finish = 0 if reason is None else (finish_codes[int(reason)] if int(reason) < len(finish_codes) else 4)
        meta = logprobs_meta(out) if logprobs_meta is not None and out.new_logprobs is not None else None
        record({"go_id": key >> 16, "index": key & 0xFFFF, "ids": [operator.index(t) for t in out.new_token_ids],
                "finish": finish, "meta": meta})
        if reason is not None:
            finished.append(out.request_id)
    return finished


class FakeRelay:
    """_govllm_shim.relay in Python: records each routed output as Go would receive it."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.calls = 0

    def __call__(self, outputs: list[Any], routes: dict[str, int], finish_codes: tuple[int, ...],
                 logprobs_meta: Any, prompt_hook: Any = None, noted: list[Any] | None = None) -> list[str]:
        self.calls += 1
        return relay_outputs(outputs, routes, finish_codes, logprobs_meta, self.records.append, prompt_hook, noted)


def decode_logprobs_meta(meta: bytes) -> list[dict[str, Any]]:
    """The relay's logprobs meta as rows of {"ids", "logprobs", "rank"} (engine/choice.go reads the same)."""
    rows, cols = struct.unpack_from("<II", meta)
    ids = array.array("i", meta[8:8 + 4 * rows * cols])
    lps = array.array("f", meta[8 + 4 * rows * cols:8 + 8 * rows * cols])
    ranks = array.array("i", meta[8 + 8 * rows * cols:])
    return [{"ids": list(ids[r * cols:(r + 1) * cols]), "logprobs": list(lps[r * cols:(r + 1) * cols]),
             "rank": ranks[r]} for r in range(rows)]


_next_go_id = itertools.count(1)


def collect(loop, backend, prompt, sampling, request_id):
    return loop.run_until_complete(_collect(backend, prompt, sampling, request_id))


async def _collect(backend, prompt, sampling, request_id) -> dict[int, dict]:
    """Runs one request through submit and a FakeRelay; returns {index: {"ids", "text", "finish",
    "deltas", "logprobs"}}. text is backend.decode of the ids, less a final stop token (as Go's
    detokenizer leaves it out): the exact streamed text is Go's, tested there."""
    relay = backend.relay
    if not isinstance(relay, FakeRelay):
        relay = backend.relay = FakeRelay()
    go_id = next(_next_go_id)
    done = await backend.submit(list(prompt), sampling, request_id, go_id)
    await done
    out: dict[int, dict] = {}
    for r in relay.records:
        if r["go_id"] != go_id:
            continue
        c = out.setdefault(r["index"], {"ids": [], "text": "", "finish": None, "deltas": 0, "logprobs": []})
        assert c["finish"] is None, "output after the finishing one"
        c["ids"] += r["ids"]
        c["finish"] = FINISH_NAMES.get(r["finish"])
        c["deltas"] += 1
        if r["meta"] is not None:
            c["logprobs"] += decode_logprobs_meta(r["meta"])
    for c in out.values():
        ids = c["ids"][:-1] if c["finish"] == "stop" and c["ids"] else c["ids"]
        c["text"] = backend.decode(ids)
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
