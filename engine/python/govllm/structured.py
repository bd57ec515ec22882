"""Structured outputs (json, json_object, regex, choice, grammar) compiled with xgrammar, bounded in time.

Both backends use this module: the transformers backend compiles a request's constraint here and
masks its rows with ``GrammarMatcher``s (backends/hf/sampler.py); the vLLM backend can pre-check a
request's constraint here (a compiler without a tokenizer builds the grammar only, no token masks)
before handing the request to vLLM, which compiles it again itself.

Where a compile runs: in a small pool of daemon threads, never on the event loop. Measured with
xgrammar 0.2.8 on this 2-core machine (SmolLM2's tokenizer, vocabulary 49152): a 50-property nested
JSON schema compiled in 0.70 s on a worker thread while an asyncio task slept 1 ms per tick; the
task ticked 602 times meanwhile and its longest gap was 6.6 ms, so xgrammar's compile releases the
GIL and a thread cannot stall the loop (or the manager's generation thread). A subprocess pool was
measured and rejected: the compiled grammar of that schema serializes to 124 MB (13 s to serialize,
4.8 s to deserialize), far more than the compile itself.

Time bound: ``compile_constraint`` waits at most ``timeout_s`` (``EngineConfig.extra
["structured_output_timeout"]``, default 5.0 s) for the compile, queueing in the pool included, then
answers a ``RequestError`` (400) naming ``spec["param"]``. A thread cannot be killed, so a compile
that times out while running goes on in its worker; this leaks at most a bounded amount:

* at most ``workers`` compiles run at once (the pool is fixed); a queued compile whose every waiter
  timed out or went away is cancelled before it starts;
* compiles are shared per (kind, text): a client retrying the same slow schema joins the compile
  already running instead of starting another;
* a compile that finishes after its waiters gave up lands in the cache, so a retry is answered at once;
* the cache is an LRU bounded in entries and in bytes (xgrammar's ``memory_size_bytes``); xgrammar's
  own unbounded cache is off.

A schema that never finishes compiling therefore costs one worker (and structured requests queue on
the others), never the loop, and never more threads or memory than the bound. Workers are daemon
threads: a runaway compile does not hold up the process's exit.

Errors: a malformed spec, invalid schema / regex / grammar, or a construct xgrammar does not support
(backreferences, lookaround, ...) is a ``RequestError`` with the spec's param and xgrammar's message.
``json_object`` is any JSON object (xgrammar's JSON grammar with an object root: the schema
``{"type": "object"}`` without strict mode; vLLM's xgrammar backend uses the builtin JSON grammar,
which also allows a top-level array). ``grammar`` is xgrammar's EBNF when it has a ``::=`` rule,
else Lark (as vLLM tells them apart). ``disable_any_whitespace`` in the spec (vLLM's
StructuredOutputsParams field) makes json and json_object compact.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from typing import Any

from .backend import STRUCTURED_KINDS, RequestError

log = logging.getLogger("govllm.structured")

TESTED_XGRAMMAR = "0.2.8"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 2  # xgrammar's threads per compile (its token-mask cache)
DEFAULT_CACHE_ENTRIES = 64
DEFAULT_CACHE_BYTES = 1 << 30
# What a message names each kind (after "invalid ..." and "the ... did not compile").
_WHAT = {"json": "json schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
         "ebnf": "grammar", "lark": "grammar"}
# xgrammar's C++ messages start with a timestamp and a source location, some with a failed check.
_XGR_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


def structured_timeout(extra: dict[str, Any] | None) -> float:
    """The compile bound in seconds from EngineConfig.extra (``structured_output_timeout``)."""
    value = (extra or {}).get("structured_output_timeout")
    if value in (None, ""):
        return DEFAULT_TIMEOUT_S
    timeout = float(value)
    if not timeout > 0:
        raise ValueError(f"structured_output_timeout must be positive, got {value!r}")
    return timeout


class CompileTimeoutError(RequestError):
    """A constraint did not compile within its time bound (the client's 400)."""


@dataclasses.dataclass(frozen=True)
class ConstraintSpec:
    """A parsed ``structured_outputs``: kind ("json", "json_object", "regex", "choice" and, for
    "grammar", "ebnf" or "lark"), its canonical source text (JSON text, a regex, EBNF or Lark),
    the request field it came from, and whether JSON may hold any whitespace."""

    kind: str
    source: str
    param: str
    any_whitespace: bool = True

    @property
    def key(self) -> tuple[str, str, bool]:
        return self.kind, self.source, self.any_whitespace

    @property
    def what(self) -> str:
        return _WHAT[self.kind]


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A compiled constraint: ``compiled`` is an ``xgrammar.CompiledGrammar`` (a compiler with a
    tokenizer) or an ``xgrammar.Grammar`` (validation only)."""

    spec: ConstraintSpec
    compiled: Any


def escape_ebnf(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal (quotes included)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def choice_grammar(choices: list[str]) -> str:
    """The EBNF whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(escape_ebnf(c) for c in choices)


def parse_spec(spec: dict[str, Any]) -> ConstraintSpec:
    """A ``structured_outputs`` dict -> ConstraintSpec; RequestError (with its param) when malformed."""
    if not isinstance(spec, dict):
        raise RequestError("structured_outputs must be an object", param="structured_outputs")
    param = str(spec.get("param") or "structured_outputs")
    kinds = [k for k in STRUCTURED_KINDS if spec.get(k) not in (None, False, "")]
    if len(kinds) != 1:
        raise RequestError("structured_outputs must set exactly one of " + ", ".join(STRUCTURED_KINDS), param=param)
    kind = kinds[0]
    value = spec[kind]
    any_ws = not bool(spec.get("disable_any_whitespace"))
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise RequestError(f"invalid json schema: not valid JSON: {exc}", param=param) from exc
        if isinstance(value, bool):
            value = {} if value else None
        if not isinstance(value, dict):
            raise RequestError("invalid json schema: a schema must be a JSON object", param=param)
        return ConstraintSpec("json", json.dumps(value, ensure_ascii=False), param, any_ws)
    if kind == "json_object":
        return ConstraintSpec("json_object", '{"type": "object"}', param, any_ws)
    if kind == "regex":
        if not isinstance(value, str):
            raise RequestError("regex must be a string", param=param)
        return ConstraintSpec("regex", value, param)
    if kind == "choice":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) for c in value)):
            raise RequestError("choice must be a non-empty list of strings", param=param)
        return ConstraintSpec("choice", choice_grammar(list(value)), param)
    if not isinstance(value, str):
        raise RequestError("grammar must be a string", param=param)
    return ConstraintSpec("ebnf" if "::=" in value else "lark", value, param)


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(exc).strip() or type(exc).__name__
    lines = [_XGR_PREFIX.sub("", line) for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:2000]


def xgrammar_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("xgrammar")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_xgrammar_version(version: str) -> None:
    if version != TESTED_XGRAMMAR:
        log.warning("xgrammar %s is not the tested %s (engine/python/tests/test_structured.py)", version,
                    TESTED_XGRAMMAR)


class _Workers:
    """A fixed pool of daemon threads running ``concurrent.futures.Future``s (queued ones can be cancelled)."""

    def __init__(self, n: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(exc)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class _Inflight:
    __slots__ = ("future", "done", "waiters", "result", "error")

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future
        self.done = asyncio.Event()
        self.waiters = 0
        self.result: Any = None
        self.error: BaseException | None = None


class StructuredCompiler:
    """Compiles structured_outputs specs for one tokenizer (or, without one, validates them).

    ``tokenizer``: a Hugging Face tokenizer; ``vocab_size``: the model's (its logits' width, which
    may exceed ``len(tokenizer)``); ``stop_token_ids``: the model's EOS ids. Construction is cheap:
    xgrammar's ``TokenizerInfo`` and ``GrammarCompiler`` are built once, on a worker, on first use.
    All methods but ``matcher`` are for the event loop's thread.
    """

    def __init__(self, tokenizer: Any = None, vocab_size: int | None = None,
                 stop_token_ids: list[int] | None = None, *, workers: int = DEFAULT_WORKERS,
                 threads: int = DEFAULT_THREADS, cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids or [])
        self.threads = max(1, int(threads))
        self.cache_entries = max(1, int(cache_entries))
        self.cache_bytes = int(cache_bytes)
        self._workers = _Workers(max(1, int(workers)), "govllm-grammar")
        self._cache: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[tuple, _Inflight] = {}
        self._setup: asyncio.Future | None = None
        self.tokenizer_info: Any = None
        self._compiler: Any = None
        self.compiles = 0  # compiles started (a cache hit or a shared compile starts none)

    # ------------------------------------------------------------------ setup

    def _build_compiler(self) -> None:
        import xgrammar as xgr

        check_xgrammar_version(xgrammar_version())
        if self.tokenizer is None:
            return
        kwargs: dict[str, Any] = {}
        if self.vocab_size:
            kwargs["vocab_size"] = int(self.vocab_size)
        if self.stop_token_ids:
            kwargs["stop_token_ids"] = list(self.stop_token_ids)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, **kwargs)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=self.threads, cache_enabled=False)

    async def ready(self) -> None:
        """Builds xgrammar's tokenizer info and compiler once (not counted in any request's bound)."""
        if self._setup is None:
            self._setup = asyncio.wrap_future(self._workers.submit(self._build_compiler))
        await asyncio.shield(self._setup)

    # ------------------------------------------------------------------ compiling

    def _build(self, spec: ConstraintSpec) -> Any:
        """On a worker: the compiled grammar (or, validation only, the grammar) of spec."""
        import xgrammar as xgr

        kind, source = spec.kind, spec.source
        c = self._compiler
        if kind == "json":
            if c is None:
                return xgr.Grammar.from_json_schema(source, any_whitespace=spec.any_whitespace)
            return c.compile_json_schema(source, any_whitespace=spec.any_whitespace)
        if kind == "json_object":
            if c is None:
                return xgr.Grammar.from_json_schema(source, any_whitespace=spec.any_whitespace, strict_mode=False)
            return c.compile_json_schema(source, any_whitespace=spec.any_whitespace, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(source) if c is None else c.compile_regex(source)
        if kind in ("choice", "ebnf"):
            return xgr.Grammar.from_ebnf(source) if c is None else c.compile_grammar(source)
        if c is None:
            return xgr.Grammar.from_lark(source) if hasattr(xgr.Grammar, "from_lark") else None
        return c.compile_lark(source)

    def cached(self, spec: ConstraintSpec) -> Constraint | None:
        hit = self._cache.get(spec.key)
        if hit is None:
            return None
        self._cache.move_to_end(spec.key)
        value = hit[0]
        if isinstance(value, BaseException):
            raise RequestError(f"invalid {spec.what}: {xgrammar_message(value)}", param=spec.param)
        return Constraint(spec, value)

    def _store(self, key: tuple, value: Any) -> None:
        if isinstance(value, BaseException):
            size = 256
        else:
            try:
                size = int(value.memory_size_bytes)
            except Exception:
                size = len(key[1])
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old[1]
        self._cache[key] = (value, size)
        self._cached_bytes += size
        while len(self._cache) > 1 and (len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes):
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped

    def _settle(self, key: tuple, entry: _Inflight) -> None:
        """On the loop, when a compile ended: cache it and wake its waiters."""
        if self._inflight.get(key) is entry:
            del self._inflight[key]
        fut = entry.future
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            entry.error = exc
            if not isinstance(exc, (MemoryError, SystemExit, KeyboardInterrupt)):
                self._store(key, exc)
        else:
            entry.result = fut.result()
            self._store(key, entry.result)
        entry.done.set()

    async def compile_constraint(self, spec: dict[str, Any] | ConstraintSpec,
                                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Constraint:
        """The compiled constraint of a ``structured_outputs`` dict, from the cache or a worker.

        Raises RequestError (param: the spec's) for a malformed spec, an invalid or unsupported
        schema / regex / grammar, or a compile that did not end within ``timeout_s`` seconds.
        """
        parsed = spec if isinstance(spec, ConstraintSpec) else parse_spec(spec)
        hit = self.cached(parsed)
        if hit is not None:
            return hit
        await self.ready()
        hit = self.cached(parsed)
        if hit is not None:
            return hit
        key = parsed.key
        loop = asyncio.get_running_loop()
        entry = self._inflight.get(key)
        if entry is None:
            entry = _Inflight(self._workers.submit(self._build, parsed))
            self._inflight[key] = entry
            self.compiles += 1

            def done(_: concurrent.futures.Future, entry: _Inflight = entry) -> None:
                try:
                    loop.call_soon_threadsafe(self._settle, key, entry)
                except RuntimeError:  # the loop is closed
                    pass

            entry.future.add_done_callback(done)
        entry.waiters += 1
        try:
            await asyncio.wait_for(entry.done.wait(), timeout=float(timeout_s))
        except asyncio.TimeoutError:
            raise CompileTimeoutError(f"the {parsed.what} did not compile within {float(timeout_s)} s "
                                      "(--structured-output-timeout)", param=parsed.param) from None
        finally:
            entry.waiters -= 1
            if not entry.done.is_set() and entry.waiters == 0 and entry.future.cancel():
                self._inflight.pop(key, None)  # never started: nobody waits for it any more
        if entry.error is not None:
            raise RequestError(f"invalid {parsed.what}: {xgrammar_message(entry.error)}",
                               param=parsed.param) from entry.error
        return Constraint(parsed, entry.result)

    # ------------------------------------------------------------------ matching

    def matcher(self, constraint: Constraint, stop_token_ids: list[int] | None = None) -> Any:
        """A fresh ``xgrammar.GrammarMatcher`` of a compiled constraint (one per choice); its stop
        tokens are ``stop_token_ids`` (default: the tokenizer info's)."""
        import xgrammar as xgr

        stops = list(stop_token_ids) if stop_token_ids else None
        return xgr.GrammarMatcher(constraint.compiled, override_stop_tokens=stops)

    def inflight(self) -> int:
        """Compiles queued or running."""
        return len(self._inflight)

    def close(self) -> None:
        self._workers.close()
        self._cache.clear()
        self._cached_bytes = 0


async def compile_constraint(compiler: StructuredCompiler, spec: dict[str, Any],
                             timeout_s: float = DEFAULT_TIMEOUT_S) -> Constraint:
    """``compiler.compile_constraint(spec, timeout_s)`` (see there)."""
    return await compiler.compile_constraint(spec, timeout_s)
