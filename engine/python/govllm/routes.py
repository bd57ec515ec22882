"""Which engine request is which Go request's choice: the routes ``_govllm_shim.relay`` reads, and
the futures the bridge awaits until every choice of a request has ended. Both token-id backends
keep their requests in a RouteTable; what ending a choice means in the engine (an abort, a
cancelled manager request) stays theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any


@dataclasses.dataclass
class Routed:
    """One Go request: its choices' engine request ids, the ones still routed, and its future."""

    go_id: int
    names: list[str]
    done: asyncio.Future
    live: set[str] = dataclasses.field(default_factory=set)
    extra: Any = None  # the backend's own per-request state


class RouteTable:
    """``routes`` maps an engine request id to ``go_id << 16 | choice index`` (relay's routes)."""

    def __init__(self) -> None:
        self.routes: dict[str, int] = {}
        self.requests: dict[int, Routed] = {}

    def __len__(self) -> int:
        return len(self.routes)

    def __contains__(self, go_id: int) -> bool:
        return go_id in self.requests

    def get(self, go_id: int) -> Routed | None:
        return self.requests.get(go_id)

    def request_of(self, name: str) -> Routed | None:
        key = self.routes.get(name)
        return None if key is None else self.requests.get(key >> 16)

    def add(self, go_id: int, names: list[str], extra: Any = None) -> Routed:
        """Route a request's choices (names[i] is choice i); on the running loop."""
        if len(names) > 1 << 16:
            raise ValueError(f"{len(names)} choices: at most 65536 fit a route")
        req = Routed(go_id=go_id, names=list(names), done=asyncio.get_running_loop().create_future(),
                     live=set(names), extra=extra)
        self.requests[go_id] = req
        for index, name in enumerate(names):
            self.routes[name] = go_id << 16 | index
        return req

    def stop(self, go_id: int, index: int) -> str | None:
        """Stop routing one choice; its name if it was still routed (the engine must end it)."""
        req = self.requests.get(go_id)
        if req is None or not 0 <= index < len(req.names):
            return None
        name = req.names[index]
        if name not in req.live:
            return None
        self._drop(req, name)
        return name

    def cancel(self, go_id: int) -> list[str]:
        """Stop routing every choice and resolve the future; the names that were still routed."""
        return self._end(go_id, None)

    def finished(self, names: list[str]) -> None:
        """The engine ended these choices (relay's return value)."""
        for name in names:
            req = self.request_of(name)
            if req is not None:
                self._drop(req, name)

    def fail(self, go_id: int, exc: BaseException) -> list[str]:
        """Fail one request; the names that were still routed."""
        return self._end(go_id, exc)

    def _end(self, go_id: int, exc: BaseException | None) -> list[str]:
        """Stop routing every choice of go_id and resolve its future (with exc, if given)."""
        req = self.requests.get(go_id)
        if req is None:
            return []
        names = [n for n in req.names if n in req.live]
        for name in names:
            self.routes.pop(name, None)
        req.live.clear()
        self._resolve(req, exc)
        return names

    def fail_all(self, exc: BaseException) -> None:
        """Fail every request (the engine died)."""
        for go_id in list(self.requests):
            self.fail(go_id, exc)

    def _drop(self, req: Routed, name: str) -> None:
        self.routes.pop(name, None)
        req.live.discard(name)
        if not req.live:
            self._resolve(req, None)

    def _resolve(self, req: Routed, exc: BaseException | None) -> None:
        if self.requests.get(req.go_id) is req:
            del self.requests[req.go_id]
        if not req.done.done():
            if exc is None:
                req.done.set_result(None)
            else:
                req.done.set_exception(exc)
