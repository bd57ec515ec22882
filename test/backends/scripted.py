"""A scripted backend for tests: it follows instructions in the prompt instead of running a model.

It exists to make the bridge's and the server's failure paths happen on cue (exceptions, hangs,
engine death, floods). It never stands in for the tests of the real backends.

Config: ``--engine-arg start_delay=S`` makes start() take S seconds; ``fail_start=MSG`` makes it
raise RuntimeError(MSG).

The prompt (a completion prompt, or the last chat message) is one command:
  echo:TEXT          stream TEXT one character per delta, then finish "stop"
  count:N            N tokens (ids 0..N-1, text " i"), "length" if max_tokens cuts it
  slow:N:MS          like count, sleeping MS milliseconds between tokens
  hang               never produce anything; wait to be aborted
  raise:MSG          raise RuntimeError(MSG) inside generate (500 for this request only)
  badrequest:MSG     raise RequestError(MSG) (400)
  die                raise EngineDeadError: the engine is dead from then on
  sick:MSG           finish normally, but health() fails from then on (as when a vLLM engine
                     core is killed while idle): the bridge's watchdog must notice
  stats              reply with JSON counters: aborts, running, started
  flood:N            call the shim's emit N times in a tight loop (the shim benchmark)
  floodnull:N        the same loop calling emit_null, which does nothing (its baseline)
  stream:N           the bridge's own loop shape: an async generator yields N Delta objects and
                     an async for emits each (what a backend's per-token Python costs at least)
  streamnull:N       the same loop calling emit_null
  tokens:KIND:N      one delta of N token ids 0..N-1 held as KIND: list, tuple, intlike (an int
                     subclass and objects with __index__, which the shim converts apart) or str
                     (not ints: the request fails with a TypeError)

Its ``tokenizer`` (for /tokenize) is ScriptedTokenizer: ids are UTF-8 bytes; a text that starts
with "slowtok:MS" takes MS milliseconds to tokenize (the bridge's loop blocks meanwhile, as a
real tokenizer's does).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from govllm.backend import Delta, EngineConfig, EngineDeadError, RequestError, SamplingParams


class ScriptedTokenizer:
    """A byte tokenizer (ids 0..255 are UTF-8 bytes, no special tokens) for the tokenize command."""

    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text.startswith("slowtok:"):
            time.sleep(int(text.split(":")[1]) / 1000)
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def __len__(self) -> int:
        return 256


class ScriptedBackend:
    name = "scripted"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.aborts = 0
        self.started = 0
        self.running: set[str] = set()
        self.dead: str | None = None
        self.tokenizer = ScriptedTokenizer()

    async def start(self) -> None:
        if self.config.extra.get("start_delay"):
            # A model that takes this long to load: startup must stay cancellable meanwhile.
            await asyncio.sleep(float(self.config.extra["start_delay"]))
        if self.config.extra.get("fail_start"):
            raise RuntimeError(str(self.config.extra["fail_start"]))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(str(messages[-1].get("content", "")))

    def encode(self, prompt: str) -> list[int]:
        return list(prompt.encode())

    def max_model_len(self) -> int:
        return self.config.max_model_len or 4096

    def health(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)

    def num_running(self) -> int:
        return len(self.running)

    async def abort(self, request_id: str) -> None:
        self.aborts += 1

    async def shutdown(self) -> None:
        pass

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        self.health()
        command = bytes(prompt_token_ids).decode()
        op, _, arg = command.partition(":")
        self.started += 1
        self.running.add(request_id)
        try:
            async for d in self._run(op, arg, sampling, request_id):
                yield d
        except asyncio.CancelledError:
            self.aborts += 1
            raise
        finally:
            self.running.discard(request_id)

    async def _run(self, op: str, arg: str, sampling: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        limit = sampling.max_tokens
        if op == "echo":
            for i, ch in enumerate(arg):
                last = i == len(arg) - 1
                cut = limit is not None and i + 1 >= limit
                yield Delta(0, [ord(ch)], ch, "stop" if last else ("length" if cut else None))
                if cut:
                    return
        elif op in ("count", "slow"):
            parts = arg.split(":")
            n = int(parts[0])
            pause = int(parts[1]) / 1000 if op == "slow" else 0.0
            for i in range(n):
                if pause:
                    await asyncio.sleep(pause)
                cut = limit is not None and i + 1 >= limit
                finish = "length" if cut else ("stop" if i == n - 1 else None)
                for c in range(sampling.n):
                    yield Delta(c, [i], f" {i}", finish)
                if cut:
                    return
        elif op == "hang":
            await asyncio.Event().wait()
        elif op == "raise":
            raise RuntimeError(arg or "scripted failure")
        elif op == "badrequest":
            raise RequestError(arg or "scripted bad request", param="messages")
        elif op == "die":
            self.dead = arg or "scripted engine death"
            raise EngineDeadError(self.dead)
        elif op == "sick":
            self.dead = arg or "scripted engine death while idle"
            yield Delta(0, [0], "ok", "stop")
        elif op == "stats":
            text = json.dumps({"aborts": self.aborts, "running": len(self.running) - 1, "started": self.started})
            yield Delta(0, [0], text, "stop")
        elif op in ("stream", "streamnull"):
            import _govllm_shim as shim

            emit = shim.emit if op == "stream" else shim.emit_null
            rid = int(request_id)

            async def deltas(n: int) -> AsyncIterator[Delta]:
                for i in range(n):
                    yield Delta(0, [i], "x", None)

            async for d in deltas(int(arg)):
                emit(rid, d.index, d.token_ids, d.text, 0)
            yield Delta(0, [], "", "stop")
        elif op in ("flood", "floodnull"):
            import _govllm_shim as shim

            emit = shim.emit if op == "flood" else shim.emit_null
            rid = int(request_id)
            n = int(arg)
            for i in range(n):
                emit(rid, 0, (i,), "x", 0)
            yield Delta(0, [], "", "stop")
        elif op == "tokens":
            kind, n = arg.split(":")
            ids: Any = list(range(int(n)))
            if kind == "tuple":
                ids = tuple(ids)
            elif kind == "intlike":
                ids = [_Int(i) if i % 2 else _Index(i) for i in ids]
            elif kind == "str":
                ids = [str(i) for i in ids]
            yield Delta(0, ids, "t" * int(n), "stop")
        else:
            raise RequestError(f"unknown scripted command {op!r}", param="messages")


class _Int(int):
    """An int subclass, as some libraries hand out token ids."""


class _Index:
    """Not an int, but convertible to one (numpy's integers behave so)."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v


def create(config: EngineConfig) -> ScriptedBackend:
    return ScriptedBackend(config)
