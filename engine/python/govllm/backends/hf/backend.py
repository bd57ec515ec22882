"""The "transformers" backend: transformers' continuous-batching manager, in process.

The model runs under ``model.init_continuous_batching`` (a background thread, a paged KV cache,
prefill and decode of every active request packed into each forward pass). The backend speaks the
bridge's token-id protocol (``submit``, ``stop_choice``, ``cancel``; see bridge.py
``_serve_tokens``): each choice is one streaming manager request; its outputs arrive on the
asyncio loop through ``register_result_handler`` (the manager delivers one engine step's outputs
in one loop callback), and every output of one loop iteration reaches Go in one
``_govllm_shim.relay`` call, as token ids: Go detokenizes (with ``tokenizer_dir()``), matches stop
strings (then tells the backend to ``stop_choice``) and counts usage. Sampling is
``sampler.PerRequestSampler`` (the manager itself runs greedy), which also masks EOS and
stop_token_ids under min_tokens and records logprobs.

Constraints, per choice within the batch: structured_outputs (compiled by govllm/structured.py on its
worker pool, within ``extra["structured_output_timeout"]`` seconds, default 5; each choice gets its
own xgrammar GrammarMatcher), logit_bias, allowed_token_ids and bad_words (vLLM's rules). The
matcher's stop tokens are the request's EOS and stop_token_ids; a constrained request keeps the
model's EOS even under ignore_eos, so a complete grammar always ends the choice ("stop").

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

import array
import asyncio
import dataclasses
import functools
import logging
import os
import random
import shutil
import struct
import tempfile
import threading
from typing import Any

from ...backend import (
    ChatOptions, EngineConfig, EngineDeadError, LoRAModule, PromptEncoder, RequestError, SamplingParams,
    UnknownModelError, context_length_error, load_chat_template, lora_modules, prompt_logprobs_meta, render_chat,
)
from ...routes import RouteTable
from ... import structured
from ...engine_stats import EngineStats
from . import compat, loading, lora, prompt_logprobs
from .sampler import SAMPLING_EPS, LogprobRecord, RequestSampling, build_sampler_class, seed_key

log = logging.getLogger("govllm.transformers")

ENGINE_NAME = "transformers"
# How often the watchdog checks the manager's thread.
WATCHDOG_INTERVAL_S = 0.5
# Options of ``extra`` passed to ContinuousBatchingConfig unchanged.
_CB_PASSTHROUGH = ("allow_block_sharing", "use_cuda_graph", "use_async_batching", "default_compile_level",
                   "scheduler_type", "max_memory_percent", "max_blocks_per_request", "auto_switch_to_flash")
_PLANNED_ONLY = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs",
                 "structured_outputs", "logit_bias", "allowed_token_ids", "bad_words")

# relay's finish_codes: an output's finish_reason is the shim's code itself (cshim/shim.h SHIM_FINISH_*).
FINISH_CODES = (0, 1, 2, 3, 4, 5)
FINISH_STOP = 1  # EOS or a stop token id (the token is in new_token_ids; Go leaves its text out)
FINISH_LENGTH = 2  # max_tokens or the context
FINISH_ERROR = 4  # the manager failed the choice (a 500)
# Choices of one request: the route key holds the choice index in 16 bits.
MAX_CHOICES = 0xFFFF


def create(config: EngineConfig) -> Any:
    """The generating backend, or with ``extra["runner"] == "pooling"`` the embedding one."""
    runner = str((config.extra or {}).get("runner") or "generate")
    if runner == "pooling":
        from .embedding import TransformersEmbeddingBackend

        return TransformersEmbeddingBackend(config)
    if runner != "generate":
        raise ValueError(f"runner {runner!r} is not supported by the transformers backend (use generate or pooling)")
    return TransformersBackend(config)


class _StartCancelled(Exception):
    """The backend was shut down while its model was loading."""


class _Output:
    """One choice's new tokens of one engine step, as ``_govllm_shim.relay`` reads them."""

    __slots__ = ("request_id", "new_token_ids", "finish_reason", "new_logprobs", "top")

    def __init__(self, request_id: str, new_token_ids: list[int], finish_reason: int | None,
                 new_logprobs: list[Any] | None = None, top: int = 0) -> None:
        self.request_id = request_id  # the engine request id (the key of the routes)
        self.new_token_ids = new_token_ids
        self.finish_reason = finish_reason  # None, or a FINISH_CODES index
        self.new_logprobs = new_logprobs  # None, or a LogprobRecord (None where missing) per new token
        self.top = top  # alternatives per token the request asked for

    def __repr__(self) -> str:
        return (f"_Output({self.request_id!r}, {self.new_token_ids!r}, finish_reason={self.finish_reason!r}, "
                f"logprobs={self.new_logprobs is not None})")


def logprobs_meta(output: _Output) -> bytes:
    """An output's logprob records as the delta record's meta, in vllm_compat.logprobs_meta's layout
    (engine/choice.go decodeLogprobs): u32 rows, u32 cols, rows*cols int32 token ids, rows*cols
    float32 logprobs (column 0 the sampled token, then the top alternatives, most likely first),
    rows int32 ranks of the sampled token. A token without a record (never expected: the sampler
    records every logprob row) gets NaN logprobs, which Go reports as its floor."""
    top = output.top
    cols = top + 1
    ids, values, ranks = array.array("i"), array.array("f"), array.array("i")
    nan = float("nan")
    for token, record in zip(output.new_token_ids, output.new_logprobs):
        if record is None:
            ids.extend([token] * cols)
            values.extend([nan] * cols)
            ranks.append(0)
            continue
        alt_ids, alt_values = record.top_ids[:top], record.top_logprobs[:top]
        ids.append(record.token)
        ids.extend(alt_ids)
        values.append(record.logprob)
        values.extend(alt_values)
        if len(alt_ids) < top:  # a vocabulary smaller than the alternatives asked for
            ids.extend([record.token] * (top - len(alt_ids)))
            values.extend([float("-inf")] * (top - len(alt_ids)))
        ranks.append(record.rank)
    return struct.pack("<II", len(ranks), cols) + ids.tobytes() + values.tobytes() + ranks.tobytes()


@dataclasses.dataclass
class _Choice:
    index: int
    engine_id: str
    eos: frozenset[int]
    params: RequestSampling
    seen: int = 0  # output tokens already relayed
    done: bool = False  # finished, stopped or cancelled: later outputs are dropped


class TransformersBackend:
    name = ENGINE_NAME
    structured_outputs = True  # xgrammar per row of the batch (structured.py, sampler.py)

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.extra = dict(config.extra or {})
        self.prompt_encoder = PromptEncoder(self._encode_with_tokenizer)
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
        self.relay: Any = None  # _govllm_shim.relay, set by the bridge before start
        self._table = RouteTable()  # engine request ids of each Go request's choices; extra: its _Choices
        self._pending: list[_Output] = []  # outputs of this loop iteration, relayed by _flush
        self._tokenizer_tmp: str | None = None  # a tokenizer.json written for Go (tokenizer_dir)
        self._watchdog: asyncio.Task | None = None
        self._dead: str | None = None
        self._closed = False
        self._start_lock = threading.Lock()  # shutdown() against a loading thread starting the manager
        self._decode_kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        self._planned_ok = True  # penalties, min_tokens and logprobs can run (see PerRequestSampler.bind_runner)
        self._transformers_version = ""
        self._structured: structured.StructuredCompiler | None = None
        self._structured_timeout = structured.structured_timeout(self.extra)
        self._adapters: list[LoRAModule] = lora_modules(self.extra)  # --lora-modules
        self._lora: lora.LoRARouter | None = None

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
        self._chat_template = load_chat_template(extra.get("chat_template"))
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
        if self._adapters:
            # A shared prompt block holds the base model's KV, not an adapter's; the LoRA hooks read
            # the step's spans on the host, which a CUDA graph replay or an overlapped step would skip.
            cb_kwargs.update(allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False)
            router = lora.LoRARouter([lora.load_adapter(m, model, self.device, self.dtype) for m in self._adapters],
                                     int(extra.get("max_loras") or 0))
            router.install(model)
            self._lora = router
            self._checkpoint()

        gen_config = GenerationConfig(do_sample=False, eos_token_id=self.eos_token_ids or None,
                                      pad_token_id=self._pad_token_id(), max_new_tokens=max_len)
        manager = model.init_continuous_batching(generation_config=gen_config,
                                                 continuous_batching_config=compat.continuous_batching_config(cb_kwargs))
        sampler = build_sampler_class()()
        sampler.lora = self._lora
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
                self._die(reason)
                return

    def _die(self, reason: str) -> None:
        """The manager can serve no more: fail every request with EngineDeadError."""
        self._dead = reason
        log.error("transformers engine died: %s", reason)
        for req in list(self._table.requests.values()):
            for choice in req.extra:
                choice.done = True
                compat.drop_handler(self.manager, choice.engine_id)
        self._table.fail_all(EngineDeadError(reason))

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
            for go_id in list(self._table.requests):
                self.cancel(go_id)
            manager, self.manager = self.manager, None
        if self._structured is not None:
            self._structured.close()
            self._structured = None
        if self._tokenizer_tmp is not None:
            shutil.rmtree(self._tokenizer_tmp, ignore_errors=True)
            self._tokenizer_tmp = None
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

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            options: ChatOptions | None = None) -> list[int]:
        tok = self.tokenizer
        template = getattr(self, "_chat_template", None)  # --chat-template, resolved at start
        if not template and not getattr(tok, "chat_template", None):
            raise RequestError("this model has no chat template: use the completions endpoint or --chat-template",
                               param="messages")
        rendered = render_chat(tok, messages, tools, template, options)
        if not isinstance(rendered, str):
            return [int(t) for t in rendered]
        return self.prompt_encoder(rendered, bool(options and options.add_special_tokens))

    def encode(self, prompt: str) -> list[int]:
        return self.prompt_encoder(prompt, True)

    def _encode_with_tokenizer(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self._decode_kwargs)

    def max_model_len(self) -> int:
        return self._max_model_len

    def tokenizer_dir(self) -> str:
        """The directory of the tokenizer.json Go detokenizes with: the tokenizer's own directory
        when it has one, else (a hub id, a tokenizer converted from a slow one, the byte-level
        stand-in of load_format=dummy) the loaded fast tokenizer saved to a private directory."""
        if self._tokenizer_tmp is not None:
            return self._tokenizer_tmp
        source = self.extra.get("tokenizer") or self.config.model
        if source and os.path.isfile(os.path.join(str(source), "tokenizer.json")):
            return str(source)
        tok = self.tokenizer
        if tok is None or not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
            raise RuntimeError(f"the tokenizer of {source} has no tokenizer.json and is not a fast tokenizer: "
                               "govllm detokenizes in Go and needs one (convert the tokenizer with transformers' "
                               "save_pretrained)")
        path = tempfile.mkdtemp(prefix="govllm-tokenizer-")
        try:
            tok.save_pretrained(path)
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError(f"saving the tokenizer of {source} wrote no tokenizer.json: govllm detokenizes in Go "
                               "and needs one")
        log.info("no tokenizer.json in %s: Go detokenizes with the loaded tokenizer, saved to %s", source, path)
        self._tokenizer_tmp = path
        return path

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
        if sampling.n > MAX_CHOICES:
            raise RequestError(f"n must be at most {MAX_CHOICES}, got {sampling.n}", param="n")
        if self.vocab_size:
            bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RequestError(f"Token id {bad[0]} is out of vocabulary", param="prompt")
            bad = [t for t in sampling.stop_token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RequestError(f"stop_token_ids contains {bad[0]}, which is out of vocabulary", param="stop_token_ids")
        self._validate_constraints(sampling)
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

    def _validate_constraints(self, sampling: SamplingParams) -> None:
        vocab = self.vocab_size
        if sampling.logit_bias:
            bad = [t for t in sampling.logit_bias if vocab and not 0 <= t < vocab]
            if bad:
                raise RequestError(f"logit_bias contains token id {bad[0]}, which is out of vocabulary "
                                   f"(size {vocab})", param="logit_bias")
        if sampling.allowed_token_ids is not None:
            ids = sampling.allowed_token_ids
            if not ids:
                raise RequestError("allowed_token_ids must not be empty", param="allowed_token_ids")
            bad = [t for t in ids if not isinstance(t, int) or (vocab and not 0 <= t < vocab)]
            if bad:
                raise RequestError(f"allowed_token_ids contains {bad[0]}, which is out of vocabulary (size {vocab})",
                                   param="allowed_token_ids")
        if sampling.bad_words is not None:
            if any(not isinstance(w, str) or not w for w in sampling.bad_words):
                raise RequestError("bad_words must be non-empty strings", param="bad_words")

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's SamplingParams.update_from_tokenizer: each word (left-stripped) tokenized alone and
        after a space; the spaced form is kept when it is a different word of as many tokens."""
        out: list[list[int]] = []
        for word in dict.fromkeys(words):
            for spaced in (False, True):
                ids = list(self.tokenizer.encode((" " if spaced else "") + word.lstrip(), add_special_tokens=False))
                if not ids:
                    if not spaced:
                        raise RequestError(f"bad_words entry {word!r} tokenizes to no tokens", param="bad_words")
                    continue
                if not spaced or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                    out.append(ids)
        vocab = self.vocab_size
        bad = [t for ids in out for t in ids if vocab and not 0 <= t < vocab]
        if bad:
            raise RequestError(f"bad_words tokenize to {bad[0]}, which is out of vocabulary", param="bad_words")
        return out

    def structured_compiler(self) -> structured.StructuredCompiler:
        """The backend's xgrammar compiler (its tokenizer info is built on first use, on a worker)."""
        if self._structured is None:
            self._structured = structured.StructuredCompiler(
                self.tokenizer, self.vocab_size or None, self.eos_token_ids,
                workers=int(self.extra.get("structured_output_workers") or structured.DEFAULT_WORKERS),
                threads=int(self.extra.get("structured_output_threads") or structured.DEFAULT_THREADS))
        return self._structured

    def _request_sampling(self, sampling: SamplingParams, choice: int, prompt_len: int,
                          stop_ids: frozenset[int], constraint: Any = None,
                          bad_words: list[list[int]] | None = None) -> RequestSampling:
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
            logit_bias=sampling.logit_bias,
            allowed=None if sampling.allowed_token_ids is None else tuple(sampling.allowed_token_ids),
            bad_words=tuple(tuple(w) for w in bad_words or ()),
        )
        if constraint is not None:
            stops = sorted(stop_ids)
            common["matcher"] = self.structured_compiler().matcher(constraint, stops)
            common["grammar_stops"] = tuple(stops)
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

    def lora_adapters(self) -> list[LoRAModule]:
        """The --lora-modules adapters (loaded at start)."""
        return list(self._adapters)

    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str,
                     go_id: int, adapter: str | None = None) -> asyncio.Future:
        """Add the request's choices to the manager (with the LoRA ``adapter``, when named); the future
        resolves once every choice ended (finished, stopped by Go or cancelled), or fails with
        EngineDeadError if the engine dies."""
        self.health()
        adapter_index = 0
        if adapter is not None:
            adapter_index = self._lora.index.get(adapter, 0) if self._lora is not None else 0
            if not adapter_index:
                raise UnknownModelError(adapter)
        if self.relay is None:
            raise RuntimeError("the transformers backend has no relay (the bridge sets it before start)")
        prompt = [int(t) for t in prompt_token_ids]
        max_new_tokens = self._validate(prompt, sampling)
        if go_id in self._table:
            raise RequestError(f"request {go_id} is already running")
        bad_words = self.bad_words_token_ids(sampling.bad_words) if sampling.bad_words else None
        constraint = None
        if sampling.structured_outputs is not None:
            constraint = await self.structured_compiler().compile_constraint(sampling.structured_outputs,
                                                                             self._structured_timeout)
            self.health()  # the engine may have died or shut down meanwhile
            if go_id in self._table:
                raise RequestError(f"request {go_id} is already running")
        manager = self.manager
        eos = set() if sampling.ignore_eos and constraint is None else set(self.eos_token_ids)
        eos.update(int(t) for t in sampling.stop_token_ids)
        eos_list = sorted(eos) or [-1]  # [-1]: no EOS at all (None would mean the manager's default)
        n = int(sampling.n)
        # Go ids are unique in the process: a name the client reuses never meets its predecessor's
        # engine requests, whose cancellation the manager may not have processed yet.
        base = f"{request_id}/{go_id}"
        choices = [
            _Choice(index=i, engine_id=base if n == 1 else f"{base}/{i}", eos=frozenset(eos),
                    params=self._request_sampling(sampling, i, len(prompt), frozenset(eos), constraint, bad_words))
            for i in range(n)
        ]
        for choice in choices:
            choice.params.adapter = adapter_index
        req = self._table.add(go_id, [c.engine_id for c in choices], extra=choices)
        try:
            for choice in choices:
                manager.register_result_handler(choice.engine_id, functools.partial(self._on_output, choice))
                added = manager.add_request(input_ids=prompt, request_id=choice.engine_id,
                                            max_new_tokens=max_new_tokens, streaming=True, eos_token_id=eos_list,
                                            govllm_sampling=choice.params)
                if added is None:
                    raise EngineDeadError(self._death_reason() or "the transformers engine refused the request")
        except BaseException:
            self.cancel(go_id)
            raise
        return req.done

    async def prompt_logprobs(self, prompt_token_ids: list[int], k: int) -> bytes:
        """The EV_PROMPT_LOGPROBS meta of a prompt (a forward pass of its own, in a thread)."""
        self.health()
        prompt = [int(t) for t in prompt_token_ids]
        if self.vocab_size and any(not 0 <= t < self.vocab_size for t in prompt):
            raise RequestError("the prompt has a token id out of the vocabulary", param="prompt")
        if len(prompt) < 2:
            return prompt_logprobs_meta([], [], [])
        arrays = await asyncio.to_thread(prompt_logprobs.compute, self.model, prompt, k, self.device)
        return prompt_logprobs_meta(*arrays)

    def stop_choice(self, go_id: int, index: int) -> None:
        """Go matched a stop string in choice index: stop it in the manager."""
        req = self._table.get(go_id)
        if req is not None and self._table.stop(go_id, index) is not None:
            self._cancel(req.extra[index])

    def cancel(self, go_id: int) -> None:
        """Abort every choice still running (the client went away, or shutdown)."""
        req = self._table.get(go_id)
        if req is None:
            return
        self._table.cancel(go_id)
        for choice in req.extra:
            self._cancel(choice)

    def _cancel(self, choice: _Choice) -> None:
        """Stop a choice in the manager (nothing to do for one the manager finished)."""
        if choice.done:
            return
        choice.done = True
        manager = self.manager
        compat.drop_handler(manager, choice.engine_id)
        if manager is not None:
            try:
                manager.cancel_request(choice.engine_id)
            except Exception as exc:
                log.debug("cancel %s: %s", choice.engine_id, exc)

    def _on_output(self, choice: _Choice, out: Any) -> None:
        """The manager's result handler (on the loop): one GenerationOutput of a choice -> an _Output
        queued for this loop iteration's relay call."""
        if choice.done:
            return  # stopped or cancelled meanwhile: a step that was already running
        tokens, finished, error = compat.read_output(out)
        if error is not None:
            self._on_error(choice, error)
            return
        first = choice.seen
        new = list(tokens[first:])
        choice.seen = first + len(new)
        reason = None
        if finished:
            choice.done = True  # the manager drops its handler itself
            reason = FINISH_STOP if tokens and tokens[-1] in choice.eos else FINISH_LENGTH
        elif not new:
            return
        params = choice.params
        if params.logprobs is not None and new:
            self._queue(_Output(choice.engine_id, new, reason, self._logprobs(params, first, new), params.logprobs))
        else:
            self._queue(_Output(choice.engine_id, new, reason))

    def _on_error(self, choice: _Choice, error: str) -> None:
        """A failed choice: the engine died (every request fails), or the request alone failed: its
        choice ends with FINISH_ERROR (a 500 in Go) and its other choices are cancelled."""
        self._cancel(choice)  # its handler dropped; cancelling a request the manager failed does nothing
        reason = self._death_reason()
        if reason is not None:
            self._die(f"{reason} ({error})")
            return
        req = self._table.request_of(choice.engine_id)
        if req is None:
            return
        log.error("request %s: generation failed: %s", choice.engine_id, error)
        self._queue(_Output(choice.engine_id, [], FINISH_ERROR))
        for other in req.extra:
            if other is not choice and self._table.stop(req.go_id, other.index) is not None:
                self._cancel(other)

    def _queue(self, output: _Output) -> None:
        self._pending.append(output)
        if len(self._pending) == 1:  # one relay call for everything that arrives in this loop iteration
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        outputs, self._pending = self._pending, []
        if not outputs:
            return
        try:
            finished = self.relay(outputs, self._table.routes, FINISH_CODES, logprobs_meta)
        except Exception as exc:
            log.exception("relaying %d outputs failed", len(outputs))
            self._fail_outputs(outputs, exc)
            return
        self._table.finished(finished)

    def _fail_outputs(self, outputs: list[_Output], exc: Exception) -> None:
        """relay raised: the requests of these outputs fail (the bridge answers 500)."""
        for output in outputs:
            req = self._table.request_of(output.request_id)
            if req is None:
                continue
            self._table.fail(req.go_id, exc)
            for choice in req.extra:
                self._cancel(choice)

    def _logprobs(self, params: RequestSampling, first: int, tokens: list[int]) -> list[LogprobRecord | None]:
        """The sampler's records of output tokens first, first+1, ... (None where a token has none)."""
        records = params.records
        entries: list[LogprobRecord | None] = []
        for index, token in enumerate(tokens, start=first):
            record = None
            while records and records[0].index < index:  # tokens the manager sampled but discarded
                records.popleft()
            while records and records[0].index == index:  # the last sample of a position is the one kept
                record = records.popleft()
            if record is not None and record.token != token:
                record = None
            if record is None:
                log.warning("no logprobs recorded for output token %d (%d)", index, token)
            entries.append(record)
        return entries

    def engine_stats(self) -> dict[str, Any]:
        """The engine's own figures for /metrics: its scheduler's running and waiting requests and
        its KV cache usage, read now. Transformers reports no prefix-cache, preemption or
        per-request phase figures, so those series stay absent."""
        stats = EngineStats()
        load = compat.scheduler_load(self.manager)
        if load is not None:
            stats.scheduler(load[0], load[1], compat.kv_cache_usage(self.manager))
        return stats.snapshot()

    def num_running(self) -> int:
        """Requests the manager still holds: result handlers plus the scheduler's running and
        waiting requests (an n>1 request counts once per choice)."""
        return len(compat.held_request_ids(self.manager))
