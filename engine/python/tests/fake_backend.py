"""A backend for bridge tests (engine "fake_backend:create"): the prompt names what it does.

``extra["start"]``: "ok" (default), "hang" (awaits forever), "block" (a blocking load in a thread,
until ``RELEASE`` is set) or "fail". Prompts: "echo" (one delta whose text is JSON of the request
id and sampling it got), "str-token" (a token that is not an int), "value-error" (a delta, then
ValueError), "bad" (RequestError), "die" (EngineDeadError), "hang" (until cancelled).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from govllm.backend import Delta, EngineConfig, EngineDeadError, RequestError, SamplingParams

RELEASE = threading.Event()  # ends a "block" start's thread
EVENTS: list[str] = []  # what happened to the backends of this process, in order


class FakeBackend:
    name = "fake"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.mode = config.extra.get("start", "ok")

    async def start(self) -> None:
        EVENTS.append(f"start:{self.mode}")
        try:
            if self.mode == "hang":
                await asyncio.Event().wait()
            elif self.mode == "block":
                await asyncio.to_thread(RELEASE.wait, 60)
            elif self.mode == "fail":
                raise RuntimeError("no model here")
        except asyncio.CancelledError:
            EVENTS.append("start cancelled")
            raise

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                            ) -> list[int]:
        return self.encode(str(messages[-1].get("content", "")))

    def encode(self, prompt: str) -> list[int]:
        return list(prompt.encode())

    def max_model_len(self) -> int:
        return 100

    def health(self) -> None:
        pass

    def num_running(self) -> int:
        return 0

    def engine_stats(self) -> dict[str, Any]:
        """The engine's own figures (EngineStats.snapshot's shape); extra stats="fail" raises."""
        if self.config.extra.get("stats") == "fail":
            raise RuntimeError("stats unavailable")
        return {"gauges": {"num_requests_running": 0.0, "kv_cache_usage_perc": 0.5}, "counters": {},
                "histograms": {}, "info": {}}

    async def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self) -> None:
        EVENTS.append("shutdown")

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingParams,
                       request_id: str) -> AsyncIterator[Delta]:
        command = bytes(prompt_token_ids).decode()
        if command.startswith("echo"):
            yield Delta(0, [1], json.dumps({"request_id": request_id, "sampling": dataclasses.asdict(sampling)}),
                        "stop")
        elif command == "str-token":
            yield Delta(0, ["a"], "a", "stop")  # type: ignore[list-item]
        elif command == "value-error":
            yield Delta(0, [1], "x", None)
            raise ValueError("a bug in the backend")
        elif command == "bad":
            raise RequestError("too long", param="messages")
        elif command == "die":
            raise EngineDeadError("gone")
        elif command == "hang":
            yield Delta(0, [1], "x", None)
            await asyncio.Event().wait()
        else:
            raise RequestError(f"unknown command {command!r}")


def create(config: EngineConfig) -> FakeBackend:
    return FakeBackend(config)
