"""A stand-in for the C shim's ``_govllm_shim`` module, and Go's side of it, for bridge tests.

Commands go in with ``send`` (as Go's shim_submit would); what the bridge emits is recorded in
``events``. Records are not staged: each emit is recorded at once.
"""

from __future__ import annotations

import array
import json
import operator
import os
import threading
import time
from typing import Any

from helpers import relay_outputs

EV_DELTA = 1  # shim.c frames emit's records with kind 1
EV_PROMPT = 8  # its payload is int32s, not JSON
EV_PROMPT_LOGPROBS = 12  # relay frames it from the prompt hook's bytes


class FakeShim:
    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._inbox: list[tuple[int, int, bytes]] = []
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ the module's functions

    def inbox_fd(self) -> int:
        return self._fd

    def take(self) -> list[tuple[int, int, bytes]]:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        with self._cond:
            items, self._inbox = self._inbox, []
        return items

    def emit(self, req_id: int, index: int, tokens: Any, text: str, finish: int, meta: bytes | None = None) -> None:
        if not isinstance(tokens, (list, tuple)):
            raise TypeError("tokens must be a list or tuple of ints")
        ids = [operator.index(t) for t in tokens]  # a str raises TypeError, as PyLong_AsLong does
        self._record({"kind": EV_DELTA, "req_id": int(req_id), "index": int(index), "tokens": ids, "text": text,
                      "finish": int(finish), "meta": json.loads(meta) if meta else None})

    def emit_event(self, req_id: int, kind: int, payload: bytes) -> None:
        if kind == EV_PROMPT:
            meta: Any = list(array.array("i", payload))
        else:
            meta = json.loads(payload) if payload else None
        self._record({"kind": int(kind), "req_id": int(req_id), "meta": meta})

    def relay(self, outputs: list[Any], routes: dict[str, int], finish_codes: tuple[int, ...],
              logprobs_meta: Any, prompt_hook: Any = None, noted: list[Any] | None = None) -> list[str]:
        """shim.c's relay: one delta record per routed output (an EV_PROMPT_LOGPROBS record first for
        what prompt_hook returns), the finished request ids returned."""
        def record(r: dict[str, Any]) -> None:
            if "prompt_logprobs" in r:
                self._record({"kind": EV_PROMPT_LOGPROBS, "req_id": r["go_id"], "meta": r["prompt_logprobs"]})
                return
            self._record({"kind": EV_DELTA, "req_id": r["go_id"], "index": r["index"], "tokens": r["ids"], "text": "",
                          "finish": r["finish"], "meta": r["meta"]})

        return relay_outputs(outputs, routes, finish_codes, logprobs_meta, record, prompt_hook, noted)

    def encode(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """Go's prompt encoder: none here (the backend's tokenizer is used)."""
        return None

    def emit_null(self, *args: Any) -> None:
        pass

    def set_flush_hook(self, hook: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    # ------------------------------------------------------------------ Go's side

    def send(self, kind: int, req_id: int = 0, data: bytes | dict = b"") -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        with self._cond:
            self._inbox.append((kind, req_id, data))
        os.eventfd_write(self._fd, 1)

    def _record(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, kind: int, req_id: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The first event of ``kind`` (for ``req_id``), waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event["kind"] == kind and (req_id is None or event["req_id"] == req_id):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event of kind {kind} for request {req_id}: {self.events}")
                self._cond.wait(left)

    def of(self, req_id: int) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["req_id"] == req_id]

    def close(self) -> None:
        os.close(self._fd)
