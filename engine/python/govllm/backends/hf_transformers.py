"""The "transformers" backend: Hugging Face transformers' continuous-batching engine, in process.

Engine
    The model runs under transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``):
    one background thread, a paged KV cache, and a scheduler that packs the prefill and decode
    tokens of every active request into each forward pass. Every ``generate`` call is one (or, for
    ``n > 1``, n) streaming request(s) of that manager, so concurrent requests share forward passes;
    outputs come back through ``register_result_handler``, which the manager calls on this asyncio
    loop (``call_soon_threadsafe``). Cancelling the consuming task, ``abort()`` and stop strings all
    call ``cancel_request``, which frees the request's cache blocks at the next step.

Attention
    The model is loaded with ``attn_implementation="sdpa"`` (override: ``extra["attn_implementation"]``);
    the manager switches it to its paged form (``paged|sdpa`` in transformers 5.17, plain ``sdpa``
    with a paged cache from 5.19). On CUDA, flash attention is used when the manager finds it.

Per-request sampling (the layer this module adds)
    The manager's own sampling is global: ``do_sample`` comes from the generation config and
    ``torch.multinomial`` draws from the process-wide RNG, so it can neither mix greedy and sampled
    requests in one batch nor honour a per-request seed. Its per-request logits processors
    (``cb_logits_processors.py``) cover temperature, top_k and top_p only, and only when the
    generation config enables them; penalties, min_tokens and min_p it has not at all, and its
    ``return_logprobs`` (one global switch, in 5.17 and 5.19) gives only the chosen token's logprob
    *after* processing (always 0 behind a sampler that returns one-hot scores) and no alternatives.
    So the manager runs greedy (``do_sample=False``) and its ``logit_processor`` is replaced by
    ``PerRequestSampler``, a ``ContinuousBatchingLogitsProcessorList``.
    Each engine request carries a ``RequestSampling`` (``logit_processor_kwargs``); the sampler sees
    the manager's request states when a batch is prepared and the raw float32 logits of the rows that
    predict a token when it is called, and returns scores that are -inf everywhere except at the
    token it chose, so the manager's argmax selects it. The steps follow vLLM's sampler:

    1. logprobs (rows that ask): log_softmax of the raw logits (vLLM's default ``raw_logprobs``): the
       chosen token's and the ``logprobs`` most likely ones'.
    2. min_tokens: EOS and stop_token_ids get -inf while fewer than min_tokens tokens were generated.
    3. penalties: repetition over prompt and output tokens (positive logits divided, negative ones
       multiplied), then frequency (times the count) and presence (once), subtracted, over output
       tokens. Greedy rows take the argmax here, so greedy with penalties stays deterministic.
    4. temperature; min_p (tokens less likely than min_p times the most likely one are dropped);
       top-k and top-p over the rest; one uniform number from a counter-based hash of (key, position)
       picks the token by inverse CDF. The draw depends only on the request's seed and the token's
       position, never on the batch, so a seeded request is reproducible whatever runs beside it;
       requests without a seed get a key from a generator seeded with ``EngineConfig.seed``.

    Two paths keep the common case cheap. Temperature, top_p, top_k, min_p, the key and the position
    are six int32 rows per request in the manager's own argument tensor: that path is tensor code
    without host syncs, also runs inside CUDA graphs, and when no row of a batch samples (checked
    on the host, outside graph capture) the scores pass through untouched. A batch in which some row
    uses penalties, min_tokens or logprobs gets a host-built plan (index lists, only for those rows)
    and runs eagerly: the sampler turns the manager's CUDA graphs off for that batch and back on for
    the next. Penalties need each request's token counts: a device pool of [slots, vocab] int32
    counts and prompt masks, one slot per penalised request in the batch. The sampler adds each
    token it picks to its slot on the device, so the history is right even with async batching,
    where the host learns a token one batch late; a request that was not in the previous batch
    (preempted, soft-reset, new) is rebuilt from its request state. Logprobs are the one host sync of
    such a batch: they are appended to the request's ``RequestSampling.records`` on the manager's
    thread and turned into ``Delta.logprobs`` (shaped as the vLLM backend shapes them, tokens
    decoded one by one) when the token reaches ``_on_output`` on the loop.

    stop_token_ids and ignore_eos map to the per-request ``eos_token_id`` set of ``add_request``;
    max_tokens (or the room left in the context when it is None) to ``max_new_tokens``. Stop
    strings are matched on the detokenized text here (``govllm.detok``; as in vLLM, not within the
    text of the first min_tokens tokens), which then cancels the request in the manager.

Load format
    ``extra["load_format"]`` (``--load-format``): auto, safetensors or pt load the checkpoint;
    "dummy" builds the model of ``config.json`` with random weights on the device (seeded by
    ``EngineConfig.seed``), for benchmarks of real shapes. The tokenizer comes from
    ``extra["tokenizer"]`` or the model directory; with dummy weights and neither, a byte-level
    tokenizer stands in (no chat template: completions only).

Configuration (``EngineConfig``)
    max_num_seqs -> ``max_requests_per_batch`` (default 256 on CUDA, 64 on CPU); max_model_len (default:
    the model's, capped by the KV cache); dtype ("auto": bfloat16 on CUDA, float32 on CPU); device
    ("": cuda when available); seed (unseeded requests, and the manager's own seed). ``extra`` keys
    (unknown ones are ignored): num_blocks; page_size (alias block_size; default 64 on CPU, 256 on
    CUDA); max_batch_tokens (tokens per forward pass, default 512 on CPU, transformers' choice on
    CUDA); gpu_memory_utilization (-> max_memory_percent, default 0.8); kv_cache_gib (CPU cache size
    when num_blocks is not given, default 1 GiB); load_format and tokenizer (see above);
    attn_implementation; allow_block_sharing (prefix caching); use_cuda_graph; use_async_batching;
    default_compile_level; scheduler_type; max_blocks_per_request; auto_switch_to_flash;
    num_threads (torch intra-op threads on CPU).
    The cache always holds at least one max_model_len request: a request that cannot fit would
    kill the manager's loop ("No requests can be scheduled and no requests can be offloaded").

Numerics
    On CPU in float32 with paged SDPA, a greedy request gives the same tokens alone and among 64
    concurrent requests (tested). Batch composition still changes matmul shapes, so bit-identical
    logits are not guaranteed in general, and in bfloat16 on CUDA near-ties can flip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

from ..backend import (
    Delta, EngineConfig, EngineDeadError, RequestError, SamplingParams, context_length_error, logprob_entry,
    render_chat,
)
from ..detok import TextStream

log = logging.getLogger("govllm.transformers")

ENGINE_NAME = "transformers"
# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# How often the watchdog checks the manager's thread.
WATCHDOG_INTERVAL_S = 0.5

# Sentinels put on a request's queue by abort(), the watchdog and shutdown().
_ABORT = object()
_DEAD = object()


def create(config: EngineConfig) -> "TransformersBackend":
    return TransformersBackend(config)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: a 32-bit integer hash evaluated with int64 tensor arithmetic, so
# it is exact on every device (no overflow: products are split into 16-bit halves).
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """lowbias32 (Chris Wellons), on Python ints."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def _mul32(x, c: int):
    """(x * c) mod 2**32 for int64 tensors holding values in [0, 2**32)."""
    hi = ((x >> 16) * c) & 0xFFFF
    lo = (x & 0xFFFF) * c
    return ((hi << 16) + lo) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(key, position):
    """One float32 in [0, 1) per row, a pure function of (key, position) (int32 tensors)."""
    import torch

    k = key.to(torch.int64) & _M32
    p = position.to(torch.int64) & _M32
    h = _mix32(k ^ _mix32(_mul32(p, 0x9E3779B9) ^ 0x632BE5AB))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def seed_key(seed: int, choice: int = 0) -> int:
    """The 32-bit sampling key of a seeded request's choice, as a signed int32."""
    s = int(seed)
    k = _mix32_int((s & _M32) ^ _mix32_int((s >> 32) & _M32) ^ _mix32_int(0x5EED0000 + choice))
    return k - (1 << 32) if k >= (1 << 31) else k


class LogprobRecord(NamedTuple):
    """The logprobs of one sampled token, as the sampler hands them to the choice that asked."""

    index: int  # the token's position among the request's output tokens
    token: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class RequestSampling:
    """The sampling parameters of one engine request (one choice), read by ``PerRequestSampler``.

    It travels in the manager's request state as ``logit_processor_kwargs["govllm_sampling"]``. The
    manager deep-copies those kwargs when it forks or soft-resets a request; a copy is this same
    object, so the logprob records the sampler appends on the manager's thread always reach the
    choice that reads them on the asyncio loop (``collections.deque``: one appender, one popper).
    """

    __slots__ = ("temperature", "top_p", "top_k", "key", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "stop_ids", "logprobs", "prompt_len", "records",
                 "penalised", "extras")

    def __init__(self, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, key: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, min_tokens: int = 0, stop_ids: tuple[int, ...] = (),
                 logprobs: int | None = None, prompt_len: int = 0) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.key = int(key)
        self.min_p = float(min_p)
        self.repetition_penalty = float(repetition_penalty)
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.min_tokens = int(min_tokens)
        self.stop_ids = tuple(int(t) for t in stop_ids)  # masked while fewer than min_tokens were generated
        self.logprobs = logprobs
        self.prompt_len = int(prompt_len)
        self.records: collections.deque[LogprobRecord] = collections.deque()
        self.penalised = (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                          or self.frequency_penalty != 0.0)
        # Anything the argument tensor cannot carry: such a batch takes the sampler's planned path.
        self.extras = self.penalised or (self.min_tokens > 0 and bool(self.stop_ids)) or logprobs is not None

    def __deepcopy__(self, memo: dict) -> "RequestSampling":
        return self

    def __copy__(self) -> "RequestSampling":
        return self

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__[:12])
        return f"RequestSampling({fields})"


@dataclasses.dataclass
class _Plan:
    """What the rows of one batch need beyond the argument tensor, built on the host by
    ``prepare_tensor_args`` and carried out on the device by the next ``__call__``."""

    # min_tokens: (row, token) pairs whose logit is -inf for this step
    mask_rows: list[int] = dataclasses.field(default_factory=list)
    mask_tokens: list[int] = dataclasses.field(default_factory=list)
    # penalties: each penalised row, the pool slot holding its request's token history, its penalties
    penalty_rows: list[int] = dataclasses.field(default_factory=list)
    penalty_ids: list[str] = dataclasses.field(default_factory=list)
    penalty_slots: list[int] = dataclasses.field(default_factory=list)
    repetition: list[float] = dataclasses.field(default_factory=list)
    presence: list[float] = dataclasses.field(default_factory=list)
    frequency: list[float] = dataclasses.field(default_factory=list)
    # slots whose history is rebuilt from the request state: (slot, token) pairs of prompts and outputs
    rebuild_slots: list[int] = dataclasses.field(default_factory=list)
    prompt_slots: list[int] = dataclasses.field(default_factory=list)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    output_slots: list[int] = dataclasses.field(default_factory=list)
    output_tokens: list[int] = dataclasses.field(default_factory=list)
    # logprobs: rows that want them, their requests, output index of the token, most alternatives asked
    logprob_rows: list[int] = dataclasses.field(default_factory=list)
    logprob_params: list[RequestSampling] = dataclasses.field(default_factory=list)
    logprob_index: list[int] = dataclasses.field(default_factory=list)
    top: int = 0


class _PenaltySlots:
    """Which row of the device-side penalty pool holds which request's token history.

    Host bookkeeping only, on the manager's thread. A slot's device counts include every output token
    up to ``counted``: the sampler adds each token it picks. A request that reappears with exactly that
    many output tokens keeps its slot; otherwise (new, or absent from the previous batch: preempted,
    soft-reset, skipped) its history is rebuilt from the request state, which is then complete — also
    with async batching, whose only unresolved token belongs to the batch just before.
    """

    def __init__(self) -> None:
        self._held: dict[str, list[int]] = {}  # request id -> [slot, output tokens counted]
        self._free: list[int] = []
        self.size = 0  # slots handed out so far: the pool's needed height

    def take(self, request_id: str, counted: int) -> tuple[int, bool]:
        """The slot for request_id's next token, and whether its history must be rebuilt first."""
        held = self._held.get(request_id)
        if held is not None and held[1] == counted:
            held[1] = counted + 1
            return held[0], False
        if held is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self.size = self.size, self.size + 1
            held = [slot, 0]
            self._held[request_id] = held
        held[1] = counted + 1  # after this step, the sampler will have counted the token it picks
        return held[0], True

    def keep_only(self, request_ids: set[str]) -> None:
        """Frees the slots of requests not in this batch (they are rebuilt if they come back)."""
        for request_id in [r for r in self._held if r not in request_ids]:
            self._free.append(self._held.pop(request_id)[0])


def _build_sampler_class():
    """Defined lazily so importing this module does not import torch/transformers."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    class PerRequestSampler(ContinuousBatchingLogitsProcessorList):
        """Per-request sampling, penalties, min_tokens and logprobs for the CB manager.

        See the module docstring. Rows of the argument tensor: 0 temperature (float32 bits), 1 top_p
        (float32 bits), 2 top_k, 3 key, 4 position, 5 min_p (float32 bits). Requests carry a
        ``RequestSampling`` as ``logit_processor_kwargs={"govllm_sampling": ...}``.
        """

        KWARG = "govllm_sampling"
        ROWS = 6

        def __init__(self) -> None:
            super().__init__(LogitsProcessorList(), per_request_processors=False, drop_unsupported_processors=True)
            self.tensors_required = self.ROWS
            self.supported_keys = {self.KWARG: RequestSampling}
            self.ignored_keys = set()
            self.do_processing = True
            # Host-side summary of the batch last prepared (prepare and call alternate on one thread).
            self._any_sampled = True
            self._any_filtered = True
            self._any_min_p = True
            self._plan: _Plan | None = None
            # Penalty history: host bookkeeping and the device pool ([slots, vocab] counts and prompt masks).
            self._slots = _PenaltySlots()
            self._counts: torch.Tensor | None = None
            self._prompt_seen: torch.Tensor | None = None
            # The manager's model runner, when CUDA graphs must be bypassed for planned batches.
            self._runner: Any = None
            self._graphs = (False, False)

        def clear(self) -> None:  # never drop the sampler
            pass

        def bind_runner(self, runner: Any) -> bool:
            """Lets planned batches run eagerly when the manager replays CUDA graphs (a replay would skip
            this Python code). Returns whether planned batches are safe with this runner."""
            graphs = (bool(getattr(runner, "use_cuda_graph_varlen", False)),
                      bool(getattr(runner, "use_cuda_graph_decode", False)))
            if not any(graphs):
                return True
            if runner is None or not hasattr(runner, "use_cuda_graph_varlen"):
                return False
            self._runner, self._graphs = runner, graphs
            return True

        def check_kwargs(self, kwargs: dict) -> None:
            for key, value in (kwargs or {}).items():
                if key != self.KWARG or not isinstance(value, RequestSampling):
                    raise ValueError(f"unexpected logit_processor_kwargs {key}={value!r}")

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            floats = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float32).view(torch.int32).tolist()
            defaults = floats[:2] + [0, 0, 0] + floats[2:]
            for row, value in enumerate(defaults):
                int32_tensor[row].fill_(value)

        def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
            floats, ints = [], []
            any_sampled = any_filtered = any_min_p = False
            plan: _Plan | None = None
            for request in requests_in_batch:
                if not request.has_new_token:
                    continue
                state = request.state
                kwargs = state.logit_processor_kwargs
                params = kwargs.get(self.KWARG) if kwargs else None
                if params is None:  # the manager's warmup requests
                    floats.append((0.0, 1.0, 0.0))
                    ints.append((0, 0, state.position_offset))
                    continue
                if params.temperature > 0:
                    any_sampled = True
                    any_filtered = any_filtered or params.top_k > 0 or params.top_p < 1.0
                    any_min_p = any_min_p or params.min_p > 0
                if params.extras:
                    plan = plan or _Plan()
                    self._plan_row(plan, len(ints), state, params)
                floats.append((params.temperature, params.top_p, params.min_p))
                ints.append((params.top_k, params.key, state.position_offset))
            self._any_sampled, self._any_filtered, self._any_min_p = any_sampled, any_filtered, any_min_p
            self._plan = plan
            self._slots.keep_only(set() if plan is None else set(plan.penalty_ids))
            self._gate_graphs(eager=plan is not None)
            if not ints:
                return arg_storage
            f = torch.tensor(floats, dtype=torch.float32).view(torch.int32).t()
            args = torch.cat([f[:2], torch.tensor(ints, dtype=torch.int32).t(), f[2:]], dim=0)
            arg_storage[: self.ROWS, : args.size(1)] = args.to(arg_storage.device)
            return arg_storage

        def _plan_row(self, plan: _Plan, row: int, state: Any, params: RequestSampling) -> None:
            """Adds one row's min_tokens mask, penalty history and logprob request to the batch plan."""
            generated = state.position_offset - params.prompt_len  # output tokens before this one
            if params.min_tokens > generated and params.stop_ids:
                plan.mask_rows.extend([row] * len(params.stop_ids))
                plan.mask_tokens.extend(params.stop_ids)
            if params.penalised:
                slot, rebuild = self._slots.take(state.request_id, generated)
                plan.penalty_rows.append(row)
                plan.penalty_ids.append(state.request_id)
                plan.penalty_slots.append(slot)
                plan.repetition.append(params.repetition_penalty)
                plan.presence.append(params.presence_penalty)
                plan.frequency.append(params.frequency_penalty)
                if rebuild:
                    # initial_tokens is the prompt, plus earlier outputs after a soft reset
                    tokens = list(state.initial_tokens) + list(state.generated_tokens)
                    prompt, output = tokens[: params.prompt_len], tokens[params.prompt_len :][:generated]
                    if len(output) < generated:
                        log.debug("request %s: %d of %d output tokens known for its penalties",
                                  state.request_id, len(output), generated)
                    plan.rebuild_slots.append(slot)
                    plan.prompt_slots.extend([slot] * len(prompt))
                    plan.prompt_tokens.extend(prompt)
                    plan.output_slots.extend([slot] * len(output))
                    plan.output_tokens.extend(output)
            if params.logprobs is not None:
                plan.logprob_rows.append(row)
                plan.logprob_params.append(params)
                plan.logprob_index.append(generated)
                plan.top = max(plan.top, params.logprobs)

        def _gate_graphs(self, eager: bool) -> None:
            """CUDA graphs off for a planned batch, back on for the next plain one."""
            runner = self._runner
            if runner is not None:
                runner.use_cuda_graph_varlen = self._graphs[0] and not eager
                runner.use_cuda_graph_decode = self._graphs[1] and not eager

        def __call__(self, input_ids, scores: torch.FloatTensor, logits_processor_args: torch.Tensor):
            capturing = scores.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing:  # a CUDA graph replays this for any batch: no host-side shortcuts
                return self.sample(scores, logits_processor_args, filtered=True, exact=True, min_p=True)
            if self._plan is not None:
                return self._call_planned(scores, logits_processor_args, self._plan)
            if not self._any_sampled:
                return scores
            return self.sample(scores, logits_processor_args, filtered=self._any_filtered, min_p=self._any_min_p)

        @torch.compiler.disable  # host-side lists per batch: keep it out of any compiled forward
        def _call_planned(self, scores: torch.Tensor, args: torch.Tensor, plan: _Plan) -> torch.Tensor:
            logits = scores
            if plan.mask_rows or plan.penalty_rows:
                logits = scores.clone()
            if plan.mask_rows:
                rows = torch.tensor(plan.mask_rows, device=scores.device)
                tokens = torch.tensor(plan.mask_tokens, device=scores.device)
                logits[rows, tokens] = float("-inf")
            if plan.penalty_rows:
                self._apply_penalties(logits, plan)
            chosen = self.choose(logits, args, sampled=self._any_sampled, filtered=self._any_filtered,
                                 min_p=self._any_min_p)
            if plan.penalty_rows:
                self._count(plan, chosen)
            if plan.logprob_rows:
                self._record_logprobs(scores, chosen, plan)
            return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

        def _pool(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            """The penalty pool, grown (doubling) to hold every slot handed out."""
            need = self._slots.size
            counts, seen = self._counts, self._prompt_seen
            have = 0 if counts is None else counts.size(0)
            if need > have:
                height = max(need, 2 * have, 8)
                grown = torch.zeros(height, vocab, dtype=torch.int32, device=device)
                grown_seen = torch.zeros(height, vocab, dtype=torch.bool, device=device)
                if have:
                    grown[:have] = counts
                    grown_seen[:have] = seen
                self._counts, self._prompt_seen = grown, grown_seen
            return self._counts, self._prompt_seen

        def _apply_penalties(self, logits: torch.Tensor, plan: _Plan) -> None:
            """vLLM's penalties, in place on the penalised rows: repetition over prompt and output tokens
            (positive logits divided, negative ones multiplied), then frequency (times the count) and
            presence (once) over output tokens, subtracted."""
            device = logits.device
            counts, prompt_seen = self._pool(logits.size(-1), device)

            def ints(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.int64, device=device)

            if plan.rebuild_slots:
                rebuilt = ints(plan.rebuild_slots)
                counts.index_fill_(0, rebuilt, 0)
                prompt_seen.index_fill_(0, rebuilt, False)
                if plan.prompt_tokens:
                    prompt_seen[ints(plan.prompt_slots), ints(plan.prompt_tokens)] = True
                if plan.output_tokens:
                    slots, tokens = ints(plan.output_slots), ints(plan.output_tokens)
                    counts.index_put_((slots, tokens), torch.ones_like(slots, dtype=torch.int32), accumulate=True)
            rows, slots = ints(plan.penalty_rows), ints(plan.penalty_slots)
            selected = logits.index_select(0, rows)
            count = counts.index_select(0, slots)
            in_output = count > 0
            if any(p != 1.0 for p in plan.repetition):
                penalty = torch.tensor(plan.repetition, dtype=selected.dtype, device=device).unsqueeze(-1)
                seen = prompt_seen.index_select(0, slots) | in_output
                penalty = torch.where(seen, penalty, 1.0)
                selected = selected * torch.where(selected > 0, 1.0 / penalty, penalty)
            if any(plan.frequency):
                frequency = torch.tensor(plan.frequency, dtype=selected.dtype, device=device).unsqueeze(-1)
                selected = selected - frequency * count
            if any(plan.presence):
                presence = torch.tensor(plan.presence, dtype=selected.dtype, device=device).unsqueeze(-1)
                selected = selected - presence * in_output
            logits.index_copy_(0, rows, selected)

        def _count(self, plan: _Plan, chosen: torch.Tensor) -> None:
            """Adds each penalised row's pick to its history on the device (no host round trip, so the
            history is right even when the host learns the token a batch later)."""
            device = chosen.device
            rows = torch.tensor(plan.penalty_rows, dtype=torch.int64, device=device)
            slots = torch.tensor(plan.penalty_slots, dtype=torch.int64, device=device)
            picks = chosen.index_select(0, rows).squeeze(-1)
            self._counts.index_put_((slots, picks), torch.ones_like(slots, dtype=torch.int32), accumulate=True)

        @staticmethod
        def _record_logprobs(raw: torch.Tensor, chosen: torch.Tensor, plan: _Plan) -> None:
            """log_softmax of the raw logits (vLLM's default raw_logprobs): the picked token's and the
            top alternatives', handed to each request's records. The one host sync of a planned batch."""
            rows = torch.tensor(plan.logprob_rows, dtype=torch.int64, device=raw.device)
            logprobs = torch.log_softmax(raw.index_select(0, rows).float(), dim=-1)
            picked = chosen.index_select(0, rows)
            values, ids = logprobs.gather(-1, picked), picked
            if plan.top:
                top_values, top_ids = logprobs.topk(plan.top, dim=-1, sorted=True)
                values, ids = torch.cat([values, top_values], dim=-1), torch.cat([ids, top_ids], dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for params, index, v, i in zip(plan.logprob_params, plan.logprob_index, values, ids):
                n = params.logprobs + 1
                params.records.append(LogprobRecord(index, i[0], v[0], tuple(i[1:n]), tuple(v[1:n])))

        @classmethod
        def sample(cls, scores: torch.Tensor, args: torch.Tensor, filtered: bool = True, exact: bool = False,
                   min_p: bool = True) -> torch.Tensor:
            """Returns scores that are -inf except at each row's chosen token."""
            chosen = cls.choose(scores, args, filtered=filtered, exact=exact, min_p=min_p)
            return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

        @staticmethod
        def choose(scores: torch.Tensor, args: torch.Tensor, sampled: bool = True, filtered: bool = True,
                   exact: bool = False, min_p: bool = True) -> torch.Tensor:
            """Each row's token, [rows, 1]: the argmax for greedy rows, else a draw.

            ``sampled``: some row samples. ``filtered``: some row may use top-k/top-p. ``min_p``: some
            row may use min_p. ``exact``: sort the whole vocabulary instead of growing a top-k candidate
            set (no host synchronisation; used under graph capture).
            """
            greedy = scores.argmax(dim=-1, keepdim=True)
            if not sampled:
                return greedy
            num_rows, vocab = scores.shape
            args = args[:, :num_rows]
            temperature = args[0].view(torch.float32)
            top_p = args[1].view(torch.float32)
            top_k, key, position = args[2], args[3], args[4]

            is_sampled = temperature > 0
            logits = scores.float() / torch.where(is_sampled, temperature, 1.0).unsqueeze(-1)
            if min_p:
                # vLLM's min_p: drop tokens less likely than min_p times the most likely one (after
                # temperature), in log space; log(0) = -inf keeps every token of rows without it.
                floor = logits.amax(dim=-1, keepdim=True) + torch.log(args[5].view(torch.float32)).unsqueeze(-1)
                logits = logits.masked_fill(logits < floor, float("-inf"))
            target = _uniform(key, position).unsqueeze(-1)  # [B, 1] in [0, 1)
            log_total = torch.logsumexp(logits, dim=-1, keepdim=True)

            # Plain temperature sampling: inverse CDF over the vocabulary in its own order.
            cdf = (logits - log_total).exp_().cumsum_(dim=-1)
            pick = torch.searchsorted(cdf, target * cdf[:, -1:], right=True).clamp_(max=vocab - 1)

            if filtered:
                # Top-k / top-p: inverse CDF over the candidates in descending order. The candidate set
                # grows until it holds every row's kept tokens, so that the full sort is rare.
                row_filtered = (top_k > 0) | (top_p < 1.0)
                candidates = vocab if exact else min(256, vocab)
                while True:
                    values, order = torch.topk(logits, candidates, dim=-1, sorted=True)
                    probs = (values - log_total).exp_()
                    cumulative = probs.cumsum(dim=-1)
                    if candidates == vocab:
                        break
                    within = (
                        ~row_filtered
                        | ((top_k > 0) & (top_k <= candidates))
                        | (cumulative[:, -1] >= top_p)
                    )
                    if bool(within.all()):
                        break
                    candidates = min(candidates * 16, vocab)
                ranks = torch.arange(candidates, device=scores.device).unsqueeze(0)
                k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = (ranks >= k) | ((cumulative - probs) >= top_p.unsqueeze(-1))
                kept_cdf = probs.masked_fill_(drop, 0.0).cumsum_(dim=-1)
                kept = torch.searchsorted(kept_cdf, target * kept_cdf[:, -1:], right=True)
                kept = order.gather(-1, kept.clamp_(max=candidates - 1))
                pick = torch.where(row_filtered.unsqueeze(-1), kept, pick)

            return torch.where(is_sampled.unsqueeze(-1), pick, greedy)

    return PerRequestSampler



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def _resolve_device(name: str) -> str:
    import torch

    name = (name or "").strip().lower()
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return name


def _resolve_dtype(name: str, device: str):
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (use auto, float32, float16 or bfloat16)")
    return getattr(torch, _DTYPES[name])


# load_format values: "dummy" builds random weights from config.json; the rest load the checkpoint.
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")


def load_model(path: str, load_format: str, dtype: Any, device: str, attn: str, seed: int | None = None) -> Any:
    """The model of ``path`` on ``device``, in eval mode.

    ``load_format="dummy"``: the architecture of ``path/config.json`` with random weights (transformers'
    own initialisation, from torch's RNG: ``seed`` makes two loads identical), created directly on the
    device, so benchmarks of real shapes need no checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    load_format = (load_format or "auto").strip().lower()
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported by the transformers backend "
                         f"(use one of {', '.join(LOAD_FORMATS)})")
    if load_format == "dummy":
        if seed is not None:
            torch.manual_seed(int(seed))
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        kwargs = {"use_safetensors": False} if load_format == "pt" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str, tokenizer: str | None = None, dummy: bool = False) -> Any:
    """The tokenizer of ``tokenizer`` (``extra["tokenizer"]``), else of the model directory.

    With dummy weights a config-only directory may have none: then a byte-level tokenizer (256 byte
    tokens, no merges, no chat template) stands in, so completions still encode and decode.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer or path)
    except Exception as exc:
        if not dummy or tokenizer:
            raise
        log.warning("no tokenizer in %s (%s): using a byte-level tokenizer", path, exc)
        return byte_tokenizer()


def byte_tokenizer() -> Any:
    """A tokenizer whose ids 0-255 are the bytes of the text (GPT-2's byte-to-character alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = [chr(c) for c in _byte_order()]
    assert set(byte_chars) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _byte_order() -> list[int]:
    """GPT-2's printable stand-in character for each byte value 0-255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return chars


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]




def _host_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes: /proc/meminfo's MemAvailable, else sysconf."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                info[name] = int(rest.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40, 1 << 40


@contextlib.contextmanager
def _host_memory_for_cpu_cache(device: str) -> Iterator[None]:
    """Make the manager's memory probe report host memory while a CPU cache is sized.

    transformers sizes its cache from ``get_device_and_memory_breakdown()``, which reports CUDA memory
    whenever CUDA is visible and needs psutil to see host memory; with neither, a CPU cache cannot
    be created at all (footprint > 0 bytes available). The probe is swapped only for the duration
    of the cache creation, and only for a CPU device.
    """
    if not device.startswith("cpu"):
        yield
        return
    from transformers.generation.continuous_batching import cache as cb_cache

    original = getattr(cb_cache, "get_device_and_memory_breakdown", None)
    if original is None:
        yield
        return

    def probe():
        import torch

        total, free = _host_memory()
        used = max(0, total - free)
        return torch.device("cpu"), total, used, used

    cb_cache.get_device_and_memory_breakdown = probe
    try:
        yield
    finally:
        cb_cache.get_device_and_memory_breakdown = original


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


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None
        self._dead: str | None = None
        self._closed = False
        self._decode_kwargs: dict[str, Any] = {}
        self._token_texts: dict[int, str] = {}
        self._planned_ok = True  # penalties, min_tokens and logprobs can run (see PerRequestSampler.bind_runner)
        self._transformers_version = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._load)
        self._watchdog = self._loop.create_task(self._watch())

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        import transformers
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cfg, extra = self.config, self.extra
        self.device = _resolve_device(cfg.device)
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        on_cpu = self.device.startswith("cpu")
        if on_cpu and extra.get("num_threads"):
            torch.set_num_threads(int(extra["num_threads"]))
        if cfg.seed is not None:
            torch.manual_seed(int(cfg.seed))

        load_format = str(extra.get("load_format") or "auto").strip().lower()
        self.tokenizer = load_tokenizer(cfg.model, extra.get("tokenizer"), dummy=load_format == "dummy")
        attn = str(extra.get("attn_implementation") or "sdpa")
        model = load_model(cfg.model, load_format, self.dtype, self.device, attn, seed=cfg.seed)
        self.model = model
        text_config = model.config.get_text_config()
        self.vocab_size = int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer))

        # EOS: generation config, then model config, then tokenizer.
        eos: list[int] = []
        for source in (getattr(model, "generation_config", None), text_config, model.config):
            eos += _as_int_list(getattr(source, "eos_token_id", None))
        if self.tokenizer.eos_token_id is not None:
            eos.append(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = sorted({t for t in eos if t >= 0})

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
        }
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        cb_kwargs["page_size" if "page_size" in fields else "block_size"] = page_size

        num_blocks = extra.get("num_blocks")
        if num_blocks is None and on_cpu:
            # A CPU cache is sized explicitly: transformers would take 90% of the host's memory.
            per_token = self._kv_bytes_per_token(text_config)
            budget = float(extra.get("kv_cache_gib", 1.0)) * (1 << 30)
            num_blocks = max(int(budget // (per_token * page_size)), 1)
        if num_blocks is not None:
            # Always room for one full-length request, or the manager's loop dies on it.
            num_blocks = max(int(num_blocks), math.ceil(max_len / page_size) + 1)
            cb_kwargs["num_blocks"] = num_blocks
        max_batch_tokens = extra.get("max_batch_tokens") or (512 if on_cpu else None)
        if max_batch_tokens:
            cb_kwargs["max_batch_tokens"] = int(max_batch_tokens)
        if extra.get("gpu_memory_utilization"):
            cb_kwargs["max_memory_percent"] = float(extra["gpu_memory_utilization"])
        elif not on_cpu:
            # transformers picks 0.9 when it sees no logits processing; ours needs vocabulary-sized temporaries.
            cb_kwargs["max_memory_percent"] = 0.8
        for key in ("allow_block_sharing", "use_cuda_graph", "use_async_batching", "default_compile_level",
                    "scheduler_type", "max_memory_percent", "max_blocks_per_request", "auto_switch_to_flash"):
            if key in extra and extra[key] is not None:
                cb_kwargs[key] = extra[key]
        cb_config = ContinuousBatchingConfig(**{k: v for k, v in cb_kwargs.items() if k in fields})

        gen_config = GenerationConfig(
            do_sample=False,
            eos_token_id=self.eos_token_ids or None,
            pad_token_id=self._pad_token_id(),
            max_new_tokens=max_len,
        )
        manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
        # Our sampling layer replaces the manager's (global) logits processing; see the module docstring.
        sampler = _build_sampler_class()()
        manager.logit_processor = sampler
        device_scope = (
            torch.cuda.device(torch.device(self.device)) if self.device.startswith("cuda") else contextlib.nullcontext()
        )
        with device_scope, _host_memory_for_cpu_cache(self.device):
            manager.warmup()  # creates the cache and batch processor here (and captures CUDA graphs if on)
        processor = manager.batch_processor
        self._transformers_version = transformers.__version__
        self._planned_ok = sampler.bind_runner(getattr(processor, "model_runner", None))
        if not self._planned_ok:
            log.warning("CUDA graphs without a model runner to bypass them: penalties, min_tokens and logprobs "
                        "are refused")
        cache = processor.cache
        self._num_blocks = int(getattr(cache, "num_blocks", 0) or 0)
        capacity = self._num_blocks * page_size
        if capacity and capacity < max_len + 1:
            new_len = max(capacity - page_size, page_size)
            log.warning("the KV cache holds %d tokens: max_model_len lowered from %d to %d", capacity, max_len, new_len)
            max_len = new_len
        self._max_model_len = max_len
        manager.start()
        self.manager = manager
        self._decode_kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        log.info(
            "transformers %s, torch %s: %s on %s (%s), attention %s, max_model_len %d, max_num_seqs %d, "
            "KV cache %d blocks of %d tokens",
            transformers.__version__, torch.__version__, cfg.model, self.device, str(self.dtype).removeprefix("torch."),
            model.config._attn_implementation, max_len, self._max_num_seqs, self._num_blocks, page_size,
        )

    @staticmethod
    def _kv_bytes_per_token(text_config) -> int:
        heads = int(getattr(text_config, "num_attention_heads", 1))
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        layers = int(text_config.num_hidden_layers)
        return 2 * layers * kv_heads * head_dim * 4  # float32 upper bound

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
            self._drain_orphans()
            reason = self._death_reason()
            if reason is not None:
                self._dead = reason
                log.error("transformers engine died: %s", reason)
                for active in list(self._active.values()):
                    active.queue.put_nowait((None, _DEAD))
                return

    def _drain_orphans(self) -> None:
        """Drops outputs the manager produced for requests we cancelled before it noticed.

        Every request here has a result handler; once a cancelled request's handler is removed,
        the step that was already running delivers its output to the manager's shared queue,
        which nothing reads: without this, each cancellation would leak an output or two.
        """
        router = getattr(self.manager, "output_router", None)
        orphans = getattr(router, "output_queue", None)
        if orphans is None:
            return
        with contextlib.suppress(Exception):
            while not orphans.empty():
                orphans.get_nowait()

    def _death_reason(self) -> str | None:
        manager = self.manager
        if manager is None:
            return None
        status = getattr(manager, "background_thread_status", None)
        fatal = getattr(status, "fatal_error", None)
        if fatal is not None:
            return f"the generation loop failed: {type(fatal).__name__}: {fatal}"
        if getattr(status, "local_status", 0) >= 2 and not self._closed:
            # HARD_STOP: the loop is failing every request before it records the error (we never hard-stop it).
            return "the generation loop is failing"
        if not manager.is_running():
            return "the generation loop exited"
        return None

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
        if self._closed:
            return
        self._closed = True
        for active in list(self._active.values()):
            active.queue.put_nowait((None, _ABORT))
        if self._watchdog is not None:
            self._watchdog.cancel()
        manager = self.manager
        if manager is not None:
            loop = asyncio.get_running_loop()

            def stop() -> None:
                try:
                    manager.stop(block=True, timeout=30)
                finally:
                    with contextlib.suppress(Exception):
                        manager.destroy()

            await loop.run_in_executor(None, stop)
        self.manager = None
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
                if name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs"):
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
                manager.register_result_handler(
                    choice.engine_id, lambda out, i=index: queue.put_nowait((i, out))
                )
                added = manager.add_request(
                    input_ids=prompt,
                    request_id=choice.engine_id,
                    max_new_tokens=max_new_tokens,
                    streaming=True,
                    eos_token_id=eos_list,
                    govllm_sampling=choice.params,
                )
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
                    self._drop_handler(choice.engine_id)
            if self._active.get(request_id) is active:
                del self._active[request_id]

    def _on_output(self, choice: _Choice, out: Any) -> Delta | None:
        """Turns one GenerationOutput of the manager into a Delta (None when there is nothing new)."""
        error = getattr(out, "error", None)
        status = int(getattr(out, "status", 0))
        if error is not None or status == 4:  # RequestStatus.FAILED
            choice.done = True
            reason = self._death_reason()
            if reason is not None:
                self._dead = reason
                raise EngineDeadError(f"{reason} ({error})")
            raise RuntimeError(f"generation failed: {error}")
        tokens = list(out.generated_tokens)
        first = choice.seen
        new = tokens[first:]
        choice.seen = len(tokens)
        finished = out.is_finished()
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
                self._drop_handler(choice.engine_id)
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
        self._drop_handler(choice.engine_id)
        manager = self.manager
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.cancel_request(choice.engine_id)

    def _drop_handler(self, engine_id: str) -> None:
        manager = self.manager
        router = getattr(manager, "output_router", None)
        if router is None:
            return
        with router._lock:
            router.result_handlers.pop(engine_id, None)

    async def abort(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is None:
            return
        for choice in active.choices:
            if not choice.done:
                self._cancel(choice)
        active.queue.put_nowait((None, _ABORT))

    # ------------------------------------------------------------------ introspection (tests, metrics)

    def engine_holds(self, request_id: str) -> bool:
        """Whether the manager still tracks any engine request of ``request_id``."""
        manager = self.manager
        if manager is None:
            return False
        ids = {request_id} | {f"{request_id}/{i}" for i in range(64)}
        with manager.output_router._lock:
            if ids & set(manager.output_router.result_handlers):
                return True
        processor = manager.batch_processor
        if processor is None:
            return False
        scheduler = processor.scheduler
        held = set(scheduler.active_requests) | set(scheduler.waiting_requests)
        return bool(ids & held)

    def num_running(self) -> int:
        """Requests the manager still holds: result handlers plus the scheduler's running and
        waiting requests (an n>1 request counts once per choice)."""
        manager = self.manager
        if manager is None:
            return 0
        with manager.output_router._lock:
            held = set(manager.output_router.result_handlers)
        processor = manager.batch_processor
        if processor is not None:
            scheduler = processor.scheduler
            held |= set(scheduler.active_requests) | set(scheduler.waiting_requests)
        return len(held)
