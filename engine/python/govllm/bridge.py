"""The bridge between the Go process and a backend.

It runs on the interpreter's main thread (the shim's boot code calls ``main``): one asyncio loop
serves every request. Commands from Go arrive through the shim's inbox (an eventfd watched with
``add_reader``, from before the backend starts, so that a shutdown can cancel the start); deltas
leave through ``_govllm_shim.emit``, which stages records in C and hands them to Go once per loop
iteration (the flush hook). Control events (``emit_event``) go out at once.
"""

from __future__ import annotations

import array
import asyncio
import functools
import importlib
import json
import logging
import sys
import traceback
from typing import Any

import _govllm_shim as shim  # created by the C shim before this module is imported

from . import embedding, tokenizing
from .backend import Backend, EngineConfig, EngineDeadError, RequestError, UnknownModelError
from .request import Request, apply_default_max_tokens, generation_defaults, parse_request

# Commands from Go (cshim/shim.h, engine/shim.go).
CMD_SUBMIT = 1
CMD_ABORT = 2
CMD_SHUTDOWN = 3
CMD_STATS = 4
CMD_STOP_CHOICE = 5
CMD_PARSE = 6
CMD_TOKENIZE = 7
CMD_EMBED = 8
# Event kinds to Go (engine/event.go). EV_DELTA records are framed by the shim's emit.
EV_DELTA = 1
EV_END = 2
EV_ERROR = 3
EV_READY = 4
EV_FATAL = 5
EV_LOG = 6
EV_STATS = 7
EV_PROMPT = 8
EV_PARSED = 9
EV_TOKENIZED = 10
EV_EMBEDDING = 11
EV_PROMPT_LOGPROBS = 12
FINISH_CODES = {None: 0, "stop": 1, "length": 2, "abort": 3, "error": 4, "repetition": 5}
HEALTH_INTERVAL = 0.25  # seconds between backend health checks
PARSER_LINGER = 60.0  # seconds a finished request's parsers wait for Go's last parse commands

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


def _fatal(message: str, **extra: Any) -> None:
    shim.emit_event(0, EV_FATAL, _meta({"message": message, **extra}))


def _backend_version(backend: Any) -> str:
    """The version of the library behind a built-in backend (GET /version), "" when unknown: the
    module is already imported by then, so this costs a lookup."""
    module = sys.modules.get(getattr(backend, "name", "")) if getattr(backend, "name", "") in BACKENDS else None
    return str(getattr(module, "__version__", "") or "")


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
        self.names: set[str] = set()  # backend request ids in use
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.watchdog: asyncio.Task[None] | None = None
        self.starting: asyncio.Task[None] | None = None
        self.ready = False
        self.shutting_down = False
        self.sampling_defaults = generation_defaults(cfg.model)
        self.parsers: Any = None  # parsing.Parsers: the server's tool-call and reasoning parsers
        self.request_parsers: dict[int, _RequestParsing] = {}  # Go request id -> its parsers

    async def run(self) -> None:
        fd = shim.inbox_fd()
        self.loop.add_reader(fd, self._on_inbox)
        try:
            if await self._start():
                self.watchdog = self.loop.create_task(self._watch_health())
                await self.stopped
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()
            self.loop.remove_reader(fd)

    async def _boot(self) -> None:
        self.backend = load_backend(self.cfg)
        if hasattr(self.backend, "submit"):
            self.backend.relay = shim.relay  # token ids straight from the engine's outputs to Go
        prompt_encoder = getattr(self.backend, "prompt_encoder", None)
        if prompt_encoder is not None:
            prompt_encoder.fast = shim.encode  # Go tokenizes prompts when it reproduces the tokenizer
        await self.backend.start()
        extra = self.cfg.extra or {}
        if extra.get("tool_call_parser") or extra.get("reasoning_parser"):
            from .parsing import Parsers  # vLLM's parser library: imported only when configured

            self.parsers = Parsers.load(extra.get("tool_call_parser") or None, extra.get("reasoning_parser") or None,
                                        getattr(self.backend, "tokenizer", None),
                                        self.cfg.served_model_name or self.cfg.model)

    async def _start(self) -> bool:
        """Start the backend; True once READY is sent. A shutdown meanwhile cancels the start."""
        self.starting = self.loop.create_task(self._boot())
        await asyncio.wait([self.starting])
        if self.starting.cancelled() or self.shutting_down:
            log.warning("engine start cancelled by shutdown")
            _fatal("engine start cancelled")
            await self._stop_backend()
            return False
        exc = self.starting.exception()
        if exc is not None:
            tb = "".join(traceback.format_exception(exc))
            log.error("engine start failed:\n%s", tb)
            _fatal(f"{type(exc).__name__}: {exc}", traceback=tb)
            return False
        assert self.backend is not None
        ready = {
            "model": self.cfg.served_model_name,
            "root": self.cfg.model,
            "max_model_len": self.backend.max_model_len(),
            "backend": self.backend.name,
            "structured_outputs": bool(getattr(self.backend, "structured_outputs", False)),
            "tool_call_parser": getattr(self.parsers, "tool_call_parser", None) or "",
            "reasoning_parser": getattr(self.parsers, "reasoning_parser", None) or "",
            "runner": getattr(self.backend, "runner", None) or embedding.RUNNER_GENERATE,
        }
        if version := _backend_version(self.backend):
            ready["backend_version"] = version
        if self._adapters():
            ready["adapters"] = [m.ready() for m in self._adapters()]
        if hasattr(self.backend, "submit"):
            try:
                ready["tokenizer"] = self.backend.tokenizer_dir()  # Go detokenizes with it
            except Exception as exc:
                log.error("engine start failed: %s", exc)
                _fatal(f"{type(exc).__name__}: {exc}")
                await self._stop_backend()
                return False
        self.ready = True
        shim.emit_event(0, EV_READY, _meta(ready))
        return True

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
                _fatal(f"{type(exc).__name__}: {exc}")
                return

    def _on_inbox(self) -> None:
        for kind, req_id, data in shim.take():
            if kind == CMD_SUBMIT:
                if not self.ready or self.shutting_down:
                    state = "shutting down" if self.shutting_down else "starting"
                    self._fail(req_id, 503, "ServiceUnavailableError", f"the engine is {state}", None)
                    continue
                task = self.loop.create_task(self._serve(req_id, data))
                task.add_done_callback(lambda t, rid=req_id: self._reap(rid, t))
                self.tasks[req_id] = task
            elif kind == CMD_PARSE:
                self._on_parse(req_id, data)
            elif kind == CMD_TOKENIZE:
                self._on_tokenize(req_id, data)
            elif kind == CMD_ABORT:
                self.request_parsers.pop(req_id, None)
                task = self.tasks.get(req_id)
                if task is not None:
                    task.cancel()
            elif kind == CMD_STATS:
                shim.emit_event(req_id, EV_STATS, _meta({
                    "backend_running": self._backend_running(),
                    "bridge_requests": len(self.tasks),
                    "health_error": self._healthy(),
                    "engine": self._engine_stats(),
                }))
            elif kind == CMD_STOP_CHOICE:
                stop_choice = getattr(self.backend, "stop_choice", None)
                if stop_choice is not None and req_id in self.tasks:
                    stop_choice(req_id, int(data))
            elif kind == CMD_EMBED:
                embedding.start(self, req_id, data, lambda rid, meta: shim.emit_event(rid, EV_EMBEDDING, meta))
            elif kind == CMD_SHUTDOWN:
                self._request_shutdown()
            else:
                log.warning("unknown command %d from Go (request %d)", kind, req_id)

    def _request_shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.ready:
            self.loop.create_task(self._shutdown())
        elif self.starting is not None:
            self.starting.cancel()  # _start reports it and stops the backend

    def _reap(self, req_id: int, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never ran _serve, which reports every other
        # ending itself: Go still waits for this request's END.
        self.tasks.pop(req_id, None)
        if req_id in self.request_parsers:
            # Go sends each choice's last parse after the request's END: keep the parsers a while,
            # but not forever (a stream its reader closed never sends it).
            self.loop.call_later(PARSER_LINGER, self.request_parsers.pop, req_id, None)
        if task.cancelled():
            shim.emit_event(req_id, EV_END, _meta({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}))

    async def _shutdown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()  # a backend shutting down is not a backend dying
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)
        await self._stop_backend()
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def _stop_backend(self) -> None:
        if self.backend is not None:
            try:
                await self.backend.shutdown()
            except Exception:
                log.exception("backend shutdown failed")

    def _prompt_ids(self, req: Request) -> list[int]:
        assert self.backend is not None
        if req.messages:
            if req.chat is not None:
                return self.backend.apply_chat_template(req.messages, tools=req.tools, options=req.chat)
            if req.tools:
                return self.backend.apply_chat_template(req.messages, tools=req.tools)
            return self.backend.apply_chat_template(req.messages)
        if req.prompt:
            return self.backend.encode(req.prompt)
        if req.prompt_token_ids:
            return list(req.prompt_token_ids)
        raise RequestError("the request has no messages, prompt or prompt_token_ids")

    def _claim(self, name: str, req_id: int) -> str:
        """A backend request id for ``name`` (the client's X-Request-Id may repeat), reserved until released."""
        if name in self.names:
            name = f"{name}-{req_id}"
        self.names.add(name)
        return name

    async def _serve(self, req_id: int, data: bytes) -> None:
        assert self.backend is not None
        rid, claimed = str(req_id), False
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            req = parse_request(data, rid, self.sampling_defaults)
            self._check_adapter(req)
            rid, claimed = self._claim(req.request_id, req_id), True
            ids = self._prompt_ids(req)
            usage["prompt_tokens"] = len(ids)
            if req.parsing:
                self._start_parsing(req_id, req)
            apply_default_max_tokens(req, len(ids), self.backend.max_model_len())
            if hasattr(self.backend, "submit"):
                await self._serve_tokens(req_id, ids, req, rid)  # Go counts the output
            else:
                await self._serve_text(req_id, ids, req, rid, usage)
        except asyncio.CancelledError:
            log.debug("request %s aborted", rid)  # by Go (client gone, Close): END below
        except RequestError as exc:
            log.debug("request %s refused: %s", rid, exc)
            self.request_parsers.pop(req_id, None)
            self._fail(req_id, exc.status, exc.type, str(exc), exc.param)
            return
        except EngineDeadError as exc:
            log.warning("request %s: the engine died: %s", rid, exc)
            self._fail(req_id, 503, "EngineDeadError", str(exc), None)
            _fatal(str(exc))
            return
        except Exception as exc:
            log.error("request %s failed:\n%s", rid, traceback.format_exc())
            self._fail(req_id, 500, "InternalServerError", f"{type(exc).__name__}: {exc}", None)
            return
        finally:
            if claimed:
                self.names.discard(rid)
        shim.emit_event(req_id, EV_END, _meta({
            "usage": usage,
        }))

    def _adapters(self) -> list[Any]:
        """The LoRA adapters the backend loaded (backend.LoRAModule), none for a backend without."""
        adapters = getattr(self.backend, "lora_adapters", None)
        return list(adapters()) if adapters is not None else []

    def _check_adapter(self, req: Request) -> None:
        """A request for an adapter the backend did not load is a 404, as for an unknown model."""
        if req.adapter is not None and all(m.name != req.adapter for m in self._adapters()):
            raise UnknownModelError(req.adapter)

    async def _serve_tokens(self, req_id: int, ids: list[int], req: Request, rid: str) -> None:
        """A token-id backend: Go gets the prompt, the engine's steps reach Go through relay."""
        backend = self.backend
        assert backend is not None
        plp = req.sampling.prompt_logprobs
        compute = getattr(backend, "prompt_logprobs", None) if plp is not None else None
        if plp is not None and compute is None and not getattr(backend, "relays_prompt_logprobs", False):
            raise RequestError("prompt_logprobs are not supported by this backend", param="prompt_logprobs")
        shim.emit_event(req_id, EV_PROMPT, array.array("i", ids).tobytes())
        if compute is not None:
            # Before the request's deltas, which Go's answer puts after them.
            shim.emit_event(req_id, EV_PROMPT_LOGPROBS, await compute(ids, int(plp)))
        if req.adapter is not None:
            done = await backend.submit(ids, req.sampling, rid, req_id, adapter=req.adapter)
        else:
            done = await backend.submit(ids, req.sampling, rid, req_id)
        try:
            await done
        except asyncio.CancelledError:
            backend.cancel(req_id)
            raise

    async def _serve_text(self, req_id: int, ids: list[int], req: Request, rid: str, usage: dict[str, int]) -> None:
        """A backend that detokenizes itself (custom backends, the scripted test backend)."""
        backend = self.backend
        assert backend is not None
        if req.sampling.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs are not supported by this backend", param="prompt_logprobs")
        emit = shim.emit
        async for d in backend.generate(ids, req.sampling, rid):
            usage["completion_tokens"] += len(d.token_ids)
            if d.logprobs is None:
                emit(req_id, d.index, d.token_ids, d.text, FINISH_CODES.get(d.finish_reason, 1))
            else:
                emit(req_id, d.index, d.token_ids, d.text, FINISH_CODES.get(d.finish_reason, 1),
                     json.dumps({"logprobs": d.logprobs}).encode())

    def _start_parsing(self, req_id: int, req: Request) -> None:
        """The parsers of a request that asked for them (RequestError when the server has none)."""
        parsing = req.parsing or {}
        tools, reasoning = bool(parsing.get("tool_calls")), bool(parsing.get("reasoning"))
        if not (tools or reasoning):
            return
        parsers = self.parsers
        if parsers is None or (tools and not parsers.tool_call_parser) or (reasoning and not parsers.reasoning_parser):
            raise RequestError("this server has no such parser: start it with --enable-auto-tool-choice "
                               "--tool-call-parser NAME or --reasoning-parser NAME", param="tools" if tools else None)
        self.request_parsers[req_id] = _RequestParsing(parsers.for_request(req.raw or {}, tool_calls=tools,
                                                                           reasoning=reasoning),
                                                       max(1, int(req.sampling.n)))

    def _on_parse(self, req_id: int, data: bytes) -> None:
        """CMD_PARSE: one choice's output through its parsers; always answered with EV_PARSED, so
        Go never waits (text unparsed when the parsers are gone or fail)."""
        try:
            cmd = json.loads(data)
            index, text = int(cmd["index"]), str(cmd.get("text") or "")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad parse command for request %d: %s", req_id, exc)
            return
        finished = bool(cmd.get("finished"))
        state = self.request_parsers.get(req_id)
        result: dict[str, Any] = {"content": text}
        if state is not None:
            try:
                result = state.parser.feed(index, text, list(cmd.get("token_ids") or []), finished,
                                           bool(cmd.get("whole")))
            except Exception:
                log.exception("request %d: the output parser failed: passing the text through", req_id)
            if finished:
                state.open -= 1
                if state.open <= 0:
                    self.request_parsers.pop(req_id, None)
        result["index"] = index
        shim.emit_event(req_id, EV_PARSED, _meta(result))

    def _on_tokenize(self, req_id: int, data: bytes) -> None:
        """CMD_TOKENIZE (govllm/tokenizing.py): always answered, EV_TOKENIZED or EV_ERROR."""
        name = str(req_id)
        try:
            if not self.ready or self.shutting_down or self.backend is None:
                state = "shutting down" if self.shutting_down else "starting"
                raise EngineDeadError(f"the engine is {state}")
            cmd = tokenizing.parse(data)
            name = str(cmd.get("request_id") or name)
            result = tokenizing.handle(self.backend, cmd)
        except RequestError as exc:
            log.debug("tokenize %s refused: %s", name, exc)
            self._fail(req_id, exc.status, exc.type, str(exc), exc.param)
            return
        except EngineDeadError as exc:
            self._fail(req_id, 503, "ServiceUnavailableError", str(exc), None)
            return
        except Exception as exc:
            log.error("tokenize %s failed:\n%s", name, traceback.format_exc())
            self._fail(req_id, 500, "InternalServerError", f"{type(exc).__name__}: {exc}", None)
            return
        shim.emit_event(req_id, EV_TOKENIZED, _meta(result))

    def _healthy(self) -> str:
        if not self.ready:
            return "the engine is starting"
        try:
            if self.backend is not None:
                self.backend.health()
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def _engine_stats(self) -> dict[str, Any] | None:
        """The backend's own figures for /metrics (engine_stats.EngineStats.snapshot), or None."""
        engine_stats = getattr(self.backend, "engine_stats", None)
        if engine_stats is None:
            return None
        try:
            return engine_stats()
        except Exception:
            log.exception("engine stats failed")
            return None

    def _backend_running(self) -> int:
        num_running = getattr(self.backend, "num_running", None)
        try:
            return int(num_running()) if num_running is not None else -1
        except Exception:
            return -1

    def _fail(self, req_id: int, status: int, type_: str, message: str, param: str | None) -> None:
        shim.emit_event(req_id, EV_ERROR, _meta({"status": status, "type": type_, "message": message,
                                                 "param": param or ""}))


class _RequestParsing:
    """A request's parsers and how many of its choices have not sent their last output yet."""

    def __init__(self, parser: Any, n: int) -> None:
        self.parser = parser
        self.open = n


def main(config: dict[str, Any]) -> None:
    """Run the bridge until Go sends shutdown (or the start fails). Called once, on the interpreter's main thread."""
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
