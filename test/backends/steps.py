"""A token-id backend without a model, for the token-path benchmark (test/tokenpath).

It behaves as an engine at full speed does: one pump task makes an engine "step" per event-loop
iteration, in which every running request gets its next token id, and hands the whole step to Go
in one ``relay`` call, as the vLLM backend hands over vLLM's EngineCoreOutputs. The ids cycle
through ``extra["ids"]`` (default: ordinary ids of the default model); a request finishes with
"length" at its max_tokens. ``extra["tokenizer"]`` is the tokenizer.json directory Go
detokenizes with ("" sends no tokenizer: Go then takes the records' empty text as is, which
measures the path without the detokenizer). ``extra["step_ms"]`` paces the steps (0: as fast as
the loop goes), so that readers keep up and every token gets its own SSE chunk, as with a real
engine whose steps take milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from govllm.backend import EngineConfig, EngineDeadError, SamplingParams

LENGTH = 2  # the shim's FINISH_LENGTH; finish_codes below is the identity
FINISH_CODES = (0, 1, 2, 3, 4, 5)
DEFAULT_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 1345, 282, 260, 1789, 314, 1064, 2014, 30]


@dataclasses.dataclass(slots=True)
class _Output:
    """The attributes relay reads, as on vLLM's EngineCoreOutput."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: int | None = None
    new_logprobs: Any = None


@dataclasses.dataclass(slots=True)
class _Request:
    name: str
    left: int
    done: asyncio.Future
    at: int = 0


class StepsBackend:
    name = "steps"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.relay: Any = None
        self.ids = [int(i) for i in config.extra.get("ids") or DEFAULT_IDS]
        self.requests: dict[int, _Request] = {}
        self.routes: dict[str, int] = {}
        self.wake = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.steps = 0
        self.step_s = float(config.extra.get("step_ms") or 0) / 1000

    async def start(self) -> None:
        self.pump = asyncio.get_running_loop().create_task(self._run())

    def tokenizer_dir(self) -> str:
        return str(self.config.extra.get("tokenizer", ""))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(str(messages[-1].get("content", "")))

    def encode(self, prompt: str) -> list[int]:
        return self.ids[:8]

    def max_model_len(self) -> int:
        return self.config.max_model_len or 1 << 20

    def health(self) -> None:
        if self.pump is not None and self.pump.done():
            raise EngineDeadError("the steps pump stopped")

    def num_running(self) -> int:
        return len(self.requests)

    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str,
                     go_id: int) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        name = f"{go_id}"
        self.requests[go_id] = _Request(name=name, left=sampling.max_tokens or 16, done=done)
        self.routes[name] = go_id << 16
        self.wake.set()
        return done

    def stop_choice(self, go_id: int, index: int) -> None:
        self.cancel(go_id)

    def cancel(self, go_id: int) -> None:
        req = self.requests.pop(go_id, None)
        if req is not None:
            self.routes.pop(req.name, None)
            if not req.done.done():
                req.done.set_result(None)

    async def _run(self) -> None:
        ids, n = self.ids, len(self.ids)
        while True:
            if not self.requests:
                self.wake.clear()
                await self.wake.wait()
            outputs = []
            for req in self.requests.values():
                req.left -= 1
                outputs.append(_Output(req.name, [ids[req.at % n]], LENGTH if req.left <= 0 else None))
                req.at += 1
            for name in self.relay(outputs, self.routes, FINISH_CODES, None):
                go_id = self.routes.pop(name) >> 16
                req = self.requests.pop(go_id)
                req.done.set_result(None)
            self.steps += 1
            await asyncio.sleep(self.step_s)  # one step per loop iteration: Go's commands get their turn

    async def shutdown(self) -> None:
        if self.pump is not None:
            self.pump.cancel()


def create(config: EngineConfig) -> StepsBackend:
    return StepsBackend(config)
