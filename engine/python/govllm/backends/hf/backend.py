"""The "transformers" backend: transformers' continuous-batching manager, in process.

The model runs under ``model.init_continuous_batching`` (a background thread, a paged KV cache,
prefill and decode of every active request packed into each forward pass). Each ``generate`` call
is one streaming manager request per choice; outputs arrive on the asyncio loop through
``register_result_handler``. Sampling is ``sampler.PerRequestSampler`` (the manager itself runs
greedy); stop strings are matched on the detokenized text (``govllm.detok``) and then cancel the
request in the manager, as do cancelling the consuming task and ``abort()``.

``EngineConfig``: max_num_seqs (default 256 on CUDA, 64 on CPU); max_model_len (default the
model's, lowered to what the KV cache holds); dtype ("auto": bfloat16 on CUDA, float32 on CPU);
device ("": cuda when available); seed. ``extra``: num_blocks; page_size (alias block_size;
default 64 on CPU, 256 on CUDA); max_batch_tokens (default 512 on CPU); gpu_memory_utilization
(-> max_memory_percent, default 0.8); kv_cache_gib (CPU cache size without num_blocks, default 1);
load_format (auto, safetensors, pt, dummy); tokenizer; attn_implementation (default sdpa);
num_threads (CPU); and, passed to ``ContinuousBatchingConfig`` as is: allow_block_sharing,
use_cuda_graph, use_async_batching, default_compile_level, scheduler_type, max_memory_percent,
max_blocks_per_request, auto_switch_to_flash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

from ...backend import (
    Delta, EngineConfig, EngineDeadError, RequestError, SamplingParams, context_length_error, logprob_entry,
    render_chat,
)
from ...detok import TextStream
from . import compat, loading
from .sampler import SAMPLING_EPS, RequestSampling, build_sampler_class, seed_key

log = logging.getLogger("govllm.transformers")

ENGINE_NAME = "transformers"
# How often the watchdog checks the manager's thread.
WATCHDOG_INTERVAL_S = 0.5
# Options of ``extra`` passed to ContinuousBatchingConfig unchanged.
_CB_PASSTHROUGH = ("allow_block_sharing", "use_cuda_graph", "use_async_batching", "default_compile_level",
                   "scheduler_type", "max_memory_percent", "max_blocks_per_request", "auto_switch_to_flash")
_PLANNED_ONLY = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs")

# Sentinels put on a request's queue by abort(), the watchdog and shutdown().
_ABORT = object()
_DEAD = object()


def create(config: EngineConfig) -> "TransformersBackend":
    return TransformersBackend(config)


class _StartCancelled(Exception):
    """The backend was shut down while its model was loading."""


@dataclasses.dataclass
class _Choice:
    index: int
    engine_id: str
    stream: TextStream
    eos: frozenset[int]
    params: RequestSampling
    seen: int = 0
    done: bool = False


@dataclasses.dataclass
class _Active:
    queue: asyncio.Queue
    choices: list[_Choice]


class TransformersBackend:
    name = ENGINE_NAME

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.extra = dict(config.extra or {})
        self.tokenizer = None
        self.model = None
        self.manager = None
        self.device = ""
        self.dtype = None
        self.eos_token_ids: list[int] = []
        self.vocab_size = 0
        self._max_model_len = 0
        self._max_num_seqs = 0
        self._page_size = 0
        self._num_blocks = 0
        self._rng = random.Random(config.seed)
        self._active: dict[str, _Active] = {}
        self._watchdog: asyncio.Task | None = None
        self._dead: str | None = None
        self._closed = False
        self._start_lock = threading.Lock()  # shutdown() against a loading thread starting the manager
        self._decode_kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        self._token_texts: dict[int, str] = {}
        self._planned_ok = True  # penalties, min_tokens and logprobs can run (see PerRequestSampler.bind_runner)
        self._transformers_version = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load in a thread, so the loop stays responsive; cancelling stops the load at its next step."""
        try:
            await asyncio.to_thread(self._load)
        except asyncio.CancelledError:
            self._closed = True
            raise
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def _checkpoint(self) -> None:
        if self._closed:
            raise _StartCancelled("the transformers backend was shut down while loading")

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        import transformers
        from transformers import GenerationConfig

        compat.check_version(transformers.__version__)
        self._transformers_version = transformers.__version__
        cfg, extra = self.config, self.extra
        self.device = loading.resolve_device(cfg.device)
        self.dtype = loading.resolve_dtype(cfg.dtype, self.device)
        on_cpu = self.device.startswith("cpu")
        if on_cpu and extra.get("num_threads"):
            torch.set_num_threads(int(extra["num_threads"]))
        if cfg.seed is not None:
            torch.manual_seed(int(cfg.seed))

        load_format = str(extra.get("load_format") or "auto").strip().lower()
        self.tokenizer = loading.load_tokenizer(cfg.model, extra.get("tokenizer"), dummy=load_format == "dummy")
        attn = str(extra.get("attn_implementation") or "sdpa")
        model = loading.load_model(cfg.model, load_format, self.dtype, self.device, attn, seed=cfg.seed)
        self._checkpoint()
        self.model = model
        text_config = model.config.get_text_config()
        self.vocab_size = int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer))
        self.eos_token_ids = loading.eos_token_ids(model, text_config, self.tokenizer)

        # Context length: the model's, or the configured one (never above the model's).
        model_len = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        max_len = int(cfg.max_model_len or 0) or model_len or 2048
        if model_len and max_len > model_len:
            log.warning("max_model_len %d is above the model's %d: using %d", max_len, model_len, model_len)
            max_len = model_len

        self._max_num_seqs = int(cfg.max_num_seqs or 0) or (64 if on_cpu else 256)
        page_size = int(extra.get("page_size") or extra.get("block_size") or (64 if on_cpu else 256))
        self._page_size = page_size
        cb_kwargs: dict[str, Any] = {
            "max_requests_per_batch": self._max_num_seqs,
            "seed": int(cfg.seed or 0),
            "return_logprobs": False,
            "page_size": page_size,
        }
        blocks = loading.num_blocks(extra, text_config, page_size, max_len, on_cpu)
        if blocks is not None:
            cb_kwargs["num_blocks"] = blocks
        max_batch_tokens = extra.get("max_batch_tokens") or (512 if on_cpu else None)
        if max_batch_tokens:
            cb_kwargs["max_batch_tokens"] = int(max_batch_tokens)
        if extra.get("gpu_memory_utilization"):
            cb_kwargs["max_memory_percent"] = float(extra["gpu_memory_utilization"])
        elif not on_cpu:
            # transformers picks 0.9 when it sees no logits processing; ours needs vocabulary-sized temporaries.
            cb_kwargs["max_memory_percent"] = 0.8
        cb_kwargs.update({k: extra[k] for k in _CB_PASSTHROUGH if extra.get(k) is not None})

        gen_config = GenerationConfig(do_sample=False, eos_token_id=self.eos_token_ids or None,
                                      pad_token_id=self._pad_token_id(), max_new_tokens=max_len)
        manager = model.init_continuous_batching(generation_config=gen_config,
                                                 continuous_batching_config=compat.continuous_batching_config(cb_kwargs))
        sampler = build_sampler_class()()
        compat.install_logits_processor(manager, sampler)
        processor = compat.warmup(manager, self.device)
        self._planned_ok = sampler.bind_runner(compat.model_runner(processor))
        if not self._planned_ok:
            log.warning("CUDA graphs without a model runner to bypass them: penalties, min_tokens and logprobs "
                        "are refused")
        self._num_blocks = compat.cache_blocks(processor)
        capacity = self._num_blocks * page_size
        if capacity and capacity < max_len + 1:
            new_len = max(capacity - page_size, page_size)
            log.warning("the KV cache holds %d tokens: max_model_len lowered from %d to %d", capacity, max_len, new_len)
            max_len = new_len
        self._max_model_len = max_len
        with self._start_lock:
            self._checkpoint()
            manager.start()
            self.manager = manager
        log.info(
            "transformers %s, torch %s: %s on %s (%s), attention %s, max_model_len %d, max_num_seqs %d, "
            "KV cache %d blocks of %d tokens",
            transformers.__version__, torch.__version__, cfg.model, self.device, str(self.dtype).removeprefix("torch."),
            model.config._attn_implementation, max_len, self._max_num_seqs, self._num_blocks, page_size,
        )

    def _pad_token_id(self) -> int | None:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else None

    async def _watch(self) -> None:
        """Fails every active request with EngineDeadError if the manager's thread dies."""
        while not self._closed:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._closed:
                return
            compat.drain_orphans(self.manager)
            reason = self._death_reason()
            if reason is not None:
                self._dead = reason
                log.error("transformers engine died: %s", reason)
                for active in list(self._active.values()):
                    active.queue.put_nowait((None, _DEAD))
                return

    def _death_reason(self) -> str | None:
        return compat.death_reason(self.manager, closing=self._closed)

    def health(self) -> None:
        if self._closed:
            raise EngineDeadError("the transformers engine is shut down")
        if self.manager is None:
            raise EngineDeadError("the transformers engine is not started")
        reason = self._dead or self._death_reason()
        if reason is not None:
            self._dead = reason
            raise EngineDeadError(reason)

    async def shutdown(self) -> None:
        with self._start_lock:
            if self._closed and self.manager is None:
                return
            self._closed = True
            manager, self.manager = self.manager, None
        for active in list(self._active.values()):
            active.queue.put_nowait((None, _ABORT))
        if self._watchdog is not None:
            self._watchdog.cancel()
        if manager is not None:
            def stop() -> None:
                try:
                    manager.stop(block=True, timeout=30)
                finally:
                    try:
                        manager.destroy()
                    except Exception as exc:
                        log.debug("manager.destroy: %s", exc)

            await asyncio.to_thread(stop)
        self.model = None

    # ------------------------------------------------------------------ tokenizer surface

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError("this model has no chat template: use the completions endpoint", param="messages")
        return list(tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self._decode_kwargs)

    def max_model_len(self) -> int:
        return self._max_model_len

    # ------------------------------------------------------------------ requests

    def _validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> int:
        """Checks the request; returns max_new_tokens."""
        sampling.validate()
        if not self._planned_ok:
            for name in sampling.non_default():
                if name in _PLANNED_ONLY:
                    raise RequestError(f"{name} is not supported by the transformers backend with CUDA graphs "
                                       f"in transformers {self._transformers_version}", param=name)
        if not prompt_token_ids:
            raise RequestError("The prompt cannot be empty.", param="prompt")
        if self.vocab_size:
            bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RequestError(f"Token id {bad[0]} is out of vocabulary", param="prompt")
            bad = [t for t in sampling.stop_token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RequestError(f"stop_token_ids contains {bad[0]}, which is out of vocabulary", param="stop_token_ids")
        if sampling.seed is not None and not isinstance(sampling.seed, int):
            raise RequestError(f"seed must be an integer, got {sampling.seed!r}", param="seed")
        if any(not isinstance(s, str) for s in sampling.stop):
            raise RequestError("stop must be a list of strings", param="stop")
        max_len = self._max_model_len
        prompt_len = len(prompt_token_ids)
        if sampling.max_tokens is None:
            if prompt_len >= max_len:
                raise context_length_error(max_len, prompt_len, None)
            return max_len - prompt_len
        if prompt_len + sampling.max_tokens > max_len:
            raise context_length_error(max_len, prompt_len, sampling.max_tokens)
        return sampling.max_tokens

    def _request_sampling(self, sampling: SamplingParams, choice: int, prompt_len: int,
                          stop_ids: frozenset[int]) -> RequestSampling:
        """One choice's parameters for the sampler; greedy requests drop temperature, top-p/k and min_p
        (as vLLM does), sampled ones get their key from the seed (or from the engine's generator)."""
        common = dict(
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            min_tokens=sampling.min_tokens,
            stop_ids=tuple(sorted(stop_ids)),
            logprobs=sampling.logprobs,
            prompt_len=prompt_len,
        )
        temperature = float(sampling.temperature)
        if temperature < SAMPLING_EPS:
            return RequestSampling(**common)
        top_k = int(sampling.top_k or 0)
        if self.vocab_size and top_k >= self.vocab_size:
            top_k = 0
        if sampling.seed is not None:
            key = seed_key(sampling.seed, choice)
        else:
            key = self._rng.getrandbits(32)
            key = key - (1 << 32) if key >= (1 << 31) else key
        return RequestSampling(temperature=temperature, top_p=float(sampling.top_p), top_k=top_k, key=key,
                               min_p=float(sampling.min_p), **common)

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[Delta]:
        self.health()
        prompt = [int(t) for t in prompt_token_ids]
        max_new_tokens = self._validate(prompt, sampling)
        if request_id in self._active:
            raise RequestError(f"request id {request_id!r} is already running")
        manager = self.manager
        eos = set() if sampling.ignore_eos else set(self.eos_token_ids)
        eos.update(int(t) for t in sampling.stop_token_ids)
        eos_list = sorted(eos) or [-1]  # [-1]: no EOS at all (None would mean the manager's default)

        queue: asyncio.Queue = asyncio.Queue()
        n = int(sampling.n)
        choices = [
            _Choice(
                index=i,
                engine_id=request_id if n == 1 else f"{request_id}/{i}",
                stream=TextStream(self.decode, prompt, sampling.stop, sampling.min_tokens),
                eos=frozenset(eos),
                params=self._request_sampling(sampling, i, len(prompt), frozenset(eos)),
            )
            for i in range(n)
        ]
        active = _Active(queue=queue, choices=choices)
        self._active[request_id] = active
        try:
            for choice in choices:
                index = choice.index
                manager.register_result_handler(choice.engine_id, lambda out, i=index: queue.put_nowait((i, out)))
                added = manager.add_request(input_ids=prompt, request_id=choice.engine_id,
                                            max_new_tokens=max_new_tokens, streaming=True, eos_token_id=eos_list,
                                            govllm_sampling=choice.params)
                if added is None:
                    raise EngineDeadError(self._death_reason() or "the transformers engine refused the request")

            remaining = n
            while remaining:
                index, out = await queue.get()
                if out is _ABORT:
                    for choice in choices:
                        if not choice.done:
                            choice.done = True
                            self._cancel(choice)
                            yield Delta(index=choice.index, token_ids=[], text="", finish_reason="abort")
                    return
                if out is _DEAD:
                    raise EngineDeadError(self._dead or "the transformers engine died")
                choice = choices[index]
                if choice.done:
                    continue
                delta = self._on_output(choice, out)
                if delta is None:
                    continue
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            for choice in choices:
                if not choice.done:
                    choice.done = True
                    self._cancel(choice)
                else:
                    compat.drop_handler(self.manager, choice.engine_id)
            if self._active.get(request_id) is active:
                del self._active[request_id]

    def _on_output(self, choice: _Choice, out: Any) -> Delta | None:
        """Turns one GenerationOutput of the manager into a Delta (None when there is nothing new)."""
        tokens, finished, error = compat.read_output(out)
        if error is not None:
            choice.done = True
            reason = self._death_reason()
            if reason is not None:
                self._dead = reason
                raise EngineDeadError(f"{reason} ({error})")
            raise RuntimeError(f"generation failed: {error}")
        first = choice.seen
        new = tokens[first:]
        choice.seen = first + len(new)
        emitted: list[int] = []
        text = []
        finish_reason = None
        for position, token in enumerate(new):
            emitted.append(token)
            is_last = finished and position == len(new) - 1
            if is_last and token in choice.eos:
                finish_reason = "stop"  # EOS or a stop token: its text is not part of the output
                break
            text.append(choice.stream.push([token]))
            if choice.stream.stopped:
                finish_reason = "stop"
                break
        if finish_reason is None and finished:
            finish_reason = "length"
        if finish_reason is not None:
            if not choice.stream.stopped:
                text.append(choice.stream.finish())
            choice.done = True
            if not finished:  # a stop string: the manager would go on generating
                self._cancel(choice)
            else:
                compat.drop_handler(self.manager, choice.engine_id)
        elif not new:
            return None
        logprobs = self._logprobs(choice.params, first, emitted) if choice.params.logprobs is not None else None
        return Delta(index=choice.index, token_ids=emitted, text="".join(text), finish_reason=finish_reason,
                     logprobs=logprobs)

    def _logprobs(self, params: RequestSampling, first: int, tokens: list[int]) -> list[dict[str, Any]]:
        """Delta.logprobs for output tokens first, first+1, ...: the sampler's records, as vllm_engine
        shapes vLLM's (the chosen token, then the top alternatives, most likely first)."""
        records = params.records
        entries = []
        for index, token in enumerate(tokens, start=first):
            record = None
            while records and records[0].index < index:  # tokens the manager sampled but discarded
                records.popleft()
            while records and records[0].index == index:  # the last sample of a position is the one kept
                record = records.popleft()
            if record is None or record.token != token:
                log.warning("no logprobs recorded for output token %d (%d)", index, token)
                entry = logprob_entry(self._token_text(token), float("nan"))
                entry["top"] = []
            else:
                entry = logprob_entry(self._token_text(token), record.logprob)
                entry["top"] = [logprob_entry(self._token_text(t), lp)
                                for t, lp in zip(record.top_ids, record.top_logprobs)]
            entries.append(entry)
        return entries

    def _token_text(self, token: int) -> str:
        """One token decoded on its own (what vLLM reports as a logprob's decoded_token), memoised."""
        text = self._token_texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            self._token_texts[token] = text
        return text

    def _cancel(self, choice: _Choice) -> None:
        manager = self.manager
        compat.drop_handler(manager, choice.engine_id)
        if manager is not None:
            try:
                manager.cancel_request(choice.engine_id)
            except Exception as exc:
                log.debug("cancel %s: %s", choice.engine_id, exc)

    async def abort(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is None:
            return
        for choice in active.choices:
            if not choice.done:
                self._cancel(choice)
        active.queue.put_nowait((None, _ABORT))

    def num_running(self) -> int:
        """Requests the manager still holds: result handlers plus the scheduler's running and
        waiting requests (an n>1 request counts once per choice)."""
        return len(compat.held_request_ids(self.manager))
