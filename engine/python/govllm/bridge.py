"""The bridge between the Go process and a backend.

It runs on the interpreter's main thread (the shim's boot code calls ``main``): one asyncio loop,
the process's only global state, serves every request. Commands from Go arrive through the
shim's inbox (an eventfd watched with ``add_reader``); deltas leave through
``_govllm_shim.emit``, which frames a binary record into a buffer private to this thread and never
calls Go; the buffer goes to the shim's queue in one piece once per loop iteration (the flush hook),
when it fills, and before any other event.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import os
import traceback
from typing import Any

import _govllm_shim as shim  # created by the C shim before this module is imported

from .backend import Backend, EngineConfig, EngineDeadError, RequestError, SamplingParams

# Commands from Go (cshim/shim.h, engine/shim.go).
CMD_SUBMIT, CMD_ABORT, CMD_SHUTDOWN, CMD_STATS = 1, 2, 3, 4
# Event kinds to Go (engine/event.go).
EV_END, EV_ERROR, EV_READY, EV_FATAL, EV_LOG, EV_STATS = 2, 3, 4, 5, 6, 7
FINISH_CODES = {None: 0, "stop": 1, "length": 2, "abort": 3}
HEALTH_INTERVAL = 0.25  # seconds between backend health checks

BACKENDS = {
    "transformers": "govllm.backends.hf_transformers:create",
    "vllm": "govllm.backends.vllm_engine:create",
}

log = logging.getLogger("govllm")


class _ShimLogHandler(logging.Handler):
    """Forwards Python log records to Go's slog through the event queue."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN"}.get(record.levelno, "ERROR")
            msg = self.format(record)
            shim.emit_event(0, EV_LOG, json.dumps({"level": level, "message": msg}).encode())
        except Exception:  # never let logging break serving
            pass


def _meta(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# generation_config.json keys that become sampling defaults, as vllm serve applies them.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k")


def generation_defaults(model_dir: str) -> dict[str, Any]:
    """The model's recommended sampling (generation_config.json), for fields a request leaves unset."""
    try:
        with open(os.path.join(model_dir, "generation_config.json")) as f:
            gc = json.load(f)
    except (OSError, ValueError):
        return {}
    if gc.get("do_sample") is False:
        defaults: dict[str, Any] = {"temperature": 0.0}  # Hugging Face's meaning: greedy
    else:
        defaults = {k: gc[k] for k in GENERATION_DEFAULTS if gc.get(k) is not None}
    if defaults:
        log.info("sampling defaults from the model's generation_config.json: %s", defaults)
    return defaults


def load_backend(cfg: EngineConfig) -> Backend:
    target = BACKENDS.get(cfg.engine, cfg.engine)
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr or "create")
    return factory(cfg)


class Bridge:
    """Owns the request table: Go request id -> the task serving it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: EngineConfig) -> None:
        self.loop = loop
        self.cfg = cfg
        self.backend: Backend | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.watchdog: asyncio.Task[None] | None = None
        self.sampling_defaults = generation_defaults(cfg.model)

    async def run(self) -> None:
        try:
            self.backend = load_backend(self.cfg)
            await self.backend.start()
        except Exception as exc:
            tb = traceback.format_exc()
            log.error("engine start failed:\n%s", tb)
            shim.emit_event(0, EV_FATAL, _meta({"message": f"{type(exc).__name__}: {exc}", "traceback": tb}))
            return
        shim.emit_event(0, EV_READY, _meta({
            "model": self.cfg.served_model_name,
            "root": self.cfg.model,
            "max_model_len": self.backend.max_model_len(),
            "backend": self.backend.name,
        }))
        fd = shim.inbox_fd()
        self.loop.add_reader(fd, self._on_inbox)
        self.watchdog = self.loop.create_task(self._watch_health())
        try:
            await self.stopped
        finally:
            self.watchdog.cancel()
            self.loop.remove_reader(fd)

    async def _watch_health(self) -> None:
        """Report engine death within HEALTH_INTERVAL even when no request is running (a killed
        vLLM engine core, a crashed generation thread), so Go answers 503 and may exit."""
        assert self.backend is not None
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                self.backend.health()
            except Exception as exc:
                log.error("engine died: %s: %s", type(exc).__name__, exc)
                shim.emit_event(0, EV_FATAL, _meta({"message": f"{type(exc).__name__}: {exc}"}))
                return

    def _on_inbox(self) -> None:
        for kind, req_id, data in shim.take():
            if kind == CMD_SUBMIT:
                task = self.loop.create_task(self._serve(req_id, data))
                task.add_done_callback(lambda t, rid=req_id: self._reap(rid, t))
                self.tasks[req_id] = task
            elif kind == CMD_ABORT:
                task = self.tasks.get(req_id)
                if task is not None:
                    task.cancel()
            elif kind == CMD_STATS:
                shim.emit_event(req_id, EV_STATS, _meta({
                    "backend_running": self._backend_running(),
                    "bridge_requests": len(self.tasks),
                    "healthy": self._healthy(),
                }))
            elif kind == CMD_SHUTDOWN:
                self.loop.create_task(self._shutdown())

    def _reap(self, req_id: int, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never ran _serve, which reports every other
        # ending itself: Go still waits for this request's END.
        self.tasks.pop(req_id, None)
        if task.cancelled():
            shim.emit_event(req_id, EV_END, _meta({"usage": {"prompt_tokens": 0, "completion_tokens": 0}, "aborted": True}))

    async def _shutdown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()  # a backend shutting down is not a backend dying
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)
        if self.backend is not None:
            try:
                await self.backend.shutdown()
            except Exception:
                log.exception("backend shutdown failed")
        if not self.stopped.done():
            self.stopped.set_result(None)

    def _prompt_ids(self, req: dict[str, Any]) -> list[int]:
        assert self.backend is not None
        if req.get("messages"):
            return self.backend.apply_chat_template(req["messages"])
        if req.get("prompt"):
            return self.backend.encode(req["prompt"])
        if req.get("prompt_token_ids"):
            return [int(t) for t in req["prompt_token_ids"]]
        raise RequestError("the request has no messages, prompt or prompt_token_ids")

    async def _serve(self, req_id: int, data: bytes) -> None:
        assert self.backend is not None
        emit = shim.emit
        prompt_tokens = completion_tokens = 0
        aborted = False
        try:
            req = json.loads(data)
            sampling = SamplingParams.from_dict({**self.sampling_defaults, **(req.get("sampling") or {})})
            ids = self._prompt_ids(req)
            prompt_tokens = len(ids)
            async for d in self.backend.generate(ids, sampling, str(req_id)):
                completion_tokens += len(d.token_ids)
                if d.logprobs is None:
                    emit(req_id, d.index, d.token_ids, d.text, FINISH_CODES.get(d.finish_reason, 1))
                else:
                    emit(req_id, d.index, d.token_ids, d.text, FINISH_CODES.get(d.finish_reason, 1),
                         json.dumps({"logprobs": d.logprobs}).encode())
        except asyncio.CancelledError:
            aborted = True  # aborted by Go (client gone, Close): report END below
        except RequestError as exc:
            self._fail(req_id, exc.status, exc.type, str(exc), exc.param)
            return
        except (TypeError, ValueError) as exc:
            self._fail(req_id, 400, "BadRequestError", f"{type(exc).__name__}: {exc}", None)
            return
        except EngineDeadError as exc:
            self._fail(req_id, 503, "EngineDeadError", str(exc), None)
            shim.emit_event(0, EV_FATAL, _meta({"message": str(exc)}))
            return
        except Exception as exc:
            log.error("request %d failed:\n%s", req_id, traceback.format_exc())
            self._fail(req_id, 500, "InternalServerError", f"{type(exc).__name__}: {exc}", None)
            return
        shim.emit_event(req_id, EV_END, _meta({
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "aborted": aborted,
            "backend_running": self._backend_running(),
        }))

    def _healthy(self) -> str:
        try:
            if self.backend is not None:
                self.backend.health()
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def _backend_running(self) -> int:
        num_running = getattr(self.backend, "num_running", None)
        try:
            return int(num_running()) if num_running is not None else -1
        except Exception:
            return -1

    def _fail(self, req_id: int, status: int, type_: str, message: str, param: str | None) -> None:
        shim.emit_event(req_id, EV_ERROR, _meta({"Status": status, "Type": type_, "Message": message, "Param": param or ""}))


def main(config: dict[str, Any]) -> None:
    """Run the bridge until Go sends shutdown. Called once, on the interpreter's main thread."""
    root = logging.getLogger()
    if not any(isinstance(h, _ShimLogHandler) for h in root.handlers):
        handler = _ShimLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if not (config.get("extra") or {}).get("debug") else logging.DEBUG)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Token records emitted on this thread are staged in C and handed to Go once per loop
    # iteration (an engine step's tokens for every request together), not one by one.
    shim.set_flush_hook(functools.partial(loop.call_soon, shim.flush))
    bridge = Bridge(loop, EngineConfig.from_dict(config))
    try:
        loop.run_until_complete(bridge.run())
    finally:
        shim.set_flush_hook(None)  # delivers what is still staged
        loop.close()
