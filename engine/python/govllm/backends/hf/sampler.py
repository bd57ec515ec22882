"""Per-request sampling for transformers' continuous-batching manager, following vLLM's sampler.

The manager runs greedy; ``PerRequestSampler`` replaces its logits processor and returns scores
that are -inf except at the token it chose, so the manager's argmax picks that token. Per row:

0. structured outputs (rows with a grammar): tokens the row's xgrammar ``GrammarMatcher`` does not
   allow get -inf (its token bitmask), before anything else, as vLLM applies the grammar bitmask to
   the logits before its sampler; once the grammar is complete only its stop tokens remain.
1. logprobs (rows that ask): log_softmax of the logits so far (vLLM's default ``raw_logprobs``: the
   model's logits, grammar-masked for a constrained row, before every other processor).
2. allowed_token_ids, bad_words (vLLM's rule: a word's last token is banned when the tokens before
   it were just generated), min_tokens (EOS and stop_token_ids get -inf while fewer than min_tokens
   tokens were generated), logit_bias (added), in vLLM's order.
3. penalties: repetition over prompt and output tokens, then frequency and presence over output
   tokens (vLLM's formulas). Greedy rows take the argmax here.
4. temperature, min_p, top-k, then top-p over the renormalised top-k survivors (vLLM's
   ``apply_top_k_top_p``); a uniform number hashed from (key, position) picks the token by inverse
   CDF, so a seeded request draws the same tokens whatever else is in the batch.

Temperature, top_p, top_k, min_p, key and position travel as six int32 rows of the manager's
argument tensor (that path also runs inside CUDA graphs). Penalties, min_tokens, logprobs and the
constraints need a host-built ``_Plan`` per batch, which runs eagerly: CUDA graphs are switched off
for such a batch. A batch without such a row costs one attribute check per row.

A constrained row's matcher advances on the manager's thread right after its token is chosen (one
host sync per planned batch with a grammar or multi-token bad words); the request's own output
history (``RequestSampling.history``) is checked against the position at each step, so a token the
manager discards (preemption, soft reset) is rolled back and a history it rebuilt is replayed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, NamedTuple

from . import compat

log = logging.getLogger("govllm.transformers")

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# The first candidate set of the growing top-k/top-p search on CPU.
FIRST_CANDIDATES = 256

# -------------------------------------------------------------------------------------------------
# Counter-based random numbers: a 32-bit integer hash evaluated with int64 tensor arithmetic, so it
# is exact on every device (no overflow: products are split into 16-bit halves).
# -------------------------------------------------------------------------------------------------

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
    rank: int = 0  # 1 + how many tokens are more likely (ties count), as vLLM's sampled_token_ranks


class RequestSampling:
    """The sampling parameters of one engine request (one choice), read by ``PerRequestSampler``.

    It travels in the manager's request state as ``logit_processor_kwargs["govllm_sampling"]``. The
    manager deep-copies those kwargs when it forks or soft-resets a request; a copy is this same
    object, so the logprob records the sampler appends on the manager's thread always reach the
    choice that reads them on the asyncio loop (``collections.deque``: one appender, one popper).
    """

    __slots__ = ("temperature", "top_p", "top_k", "key", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "stop_ids", "logprobs", "prompt_len", "records",
                 "penalised", "extras", "matcher", "grammar_stops", "bias_ids", "bias_values", "allowed",
                 "bad_words", "tracked", "history", "adapter")

    def __init__(self, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, key: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, min_tokens: int = 0, stop_ids: tuple[int, ...] = (),
                 logprobs: int | None = None, prompt_len: int = 0, matcher: Any = None,
                 grammar_stops: tuple[int, ...] = (), logit_bias: dict[int, float] | None = None,
                 allowed: tuple[int, ...] | None = None, bad_words: tuple[tuple[int, ...], ...] = (),
                 adapter: int = 0) -> None:
        self.temperature = float(temperature)
        self.adapter = int(adapter)  # the LoRA adapter's index in lora.LoRARouter (0: the base model)
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
        # Constraints: an xgrammar GrammarMatcher (one per choice) and its stop tokens; logit_bias as
        # parallel tuples; the only tokens allowed; bad words as token sequences.
        self.matcher = matcher
        self.grammar_stops = tuple(int(t) for t in grammar_stops)
        bias = {int(k): float(v) for k, v in (logit_bias or {}).items() if float(v) != 0.0}
        self.bias_ids = tuple(bias)
        self.bias_values = tuple(bias.values())
        self.allowed = None if allowed is None else tuple(sorted({int(t) for t in allowed}))
        self.bad_words = tuple(tuple(int(t) for t in w) for w in bad_words if w)
        # Rows that follow their output tokens on the host: a grammar, or a bad word of several tokens.
        self.tracked = matcher is not None or any(len(w) > 1 for w in self.bad_words)
        self.history: list[int] = []  # the output tokens the host has followed (matcher accepted)
        constrained = (matcher is not None or bool(self.bias_ids) or self.allowed is not None
                       or bool(self.bad_words))
        # Anything the argument tensor cannot carry: such a batch takes the sampler's planned path.
        self.extras = (self.penalised or (self.min_tokens > 0 and bool(self.stop_ids)) or logprobs is not None
                       or constrained)

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
    # constraints: (row, token, bias) triples; rows with allowed tokens and their (row, token) pairs
    bias_rows: list[int] = dataclasses.field(default_factory=list)
    bias_tokens: list[int] = dataclasses.field(default_factory=list)
    bias_values: list[float] = dataclasses.field(default_factory=list)
    allowed_rows: list[int] = dataclasses.field(default_factory=list)
    allowed_pairs_rows: list[int] = dataclasses.field(default_factory=list)
    allowed_pairs_tokens: list[int] = dataclasses.field(default_factory=list)
    # rows followed on the host (grammar, multi-token bad words): row, params, output index, state
    tracked: list[tuple[int, RequestSampling, int, Any]] = dataclasses.field(default_factory=list)
    any_grammar: bool = False


class _PenaltySlots:
    """Which row of the device-side penalty pool holds which request's token history.

    Host bookkeeping only, on the manager's thread. A slot's device counts include every output token
    up to ``counted``: the sampler adds each token it picks. A request that reappears with exactly that
    many output tokens keeps its slot; otherwise (new, or absent from the previous batch: preempted,
    soft-reset, skipped) its history is rebuilt from the request state, which is then complete, also
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


def scaled_logits(scores, args, min_p: bool = True):
    """(float32 logits after temperature and min_p, which rows sample) of a batch.

    vLLM's min_p: tokens less likely than min_p times the most likely one (after temperature) are
    dropped, in log space; log(0) = -inf keeps every token of rows without it.
    """
    import torch

    args = args[:, : scores.size(0)]
    temperature = args[0].view(torch.float32)
    is_sampled = temperature > 0
    logits = scores.float() / torch.where(is_sampled, temperature, 1.0).unsqueeze(-1)
    if min_p:
        floor = logits.amax(dim=-1, keepdim=True) + torch.log(args[5].view(torch.float32)).unsqueeze(-1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits, is_sampled


def kept_candidates(logits, log_total, args, is_sampled, exact: bool = False, candidates: int | None = None):
    """Top-k, then top-p over the renormalised top-k survivors (vLLM's apply_top_k_top_p).

    Returns (rows that filter [B], candidate token ids by descending logit [B, C], each candidate's
    probability in the whole distribution, 0 where dropped [B, C]). The candidates are the whole
    vocabulary (``exact``), the ``candidates`` most likely (enough when every filtering row has a
    top_k no larger), or a set grown from FIRST_CANDIDATES until it holds every row's kept tokens
    (one host sync per try).
    """
    import torch

    vocab = logits.size(-1)
    args = args[:, : logits.size(0)]
    top_p = args[1].view(torch.float32)
    top_k = args[2]
    has_k = top_k > 0
    row_filtered = is_sampled & (has_k | (top_p < 1.0))
    size = vocab if exact else min(candidates or FIRST_CANDIDATES, vocab)
    while True:
        values, order = torch.topk(logits, size, dim=-1, sorted=True)
        probs = (values - log_total).exp_()
        if size == vocab or candidates is not None:
            break
        # A row with top_k needs all of its top-k; one without, the tokens up to top_p of the mass.
        within = ~row_filtered | (has_k & (top_k <= size)) | (~has_k & (probs.sum(dim=-1) >= top_p))
        if bool(within.all()):
            break
        size = min(size * 16, vocab)
    ranks = torch.arange(size, device=logits.device).unsqueeze(0)
    survivors = probs.masked_fill_(ranks >= torch.where(has_k, top_k, vocab).unsqueeze(-1), 0.0)
    cumulative = survivors.cumsum(dim=-1)
    mass = torch.where(has_k, cumulative[:, -1], 1.0).unsqueeze(-1)  # the top-k survivors' share
    # Keep the smallest prefix whose renormalised mass reaches top_p (the first token always stays).
    above = (cumulative - survivors) / mass
    kept = survivors.masked_fill_(above >= top_p.unsqueeze(-1), 0.0)
    return row_filtered, order, kept


def build_sampler_class() -> type:
    """``PerRequestSampler``, defined lazily so that importing this module imports no torch."""
    import torch

    class PerRequestSampler(compat.logits_processor_list_base()):
        """Per-request sampling, penalties, min_tokens and logprobs for the CB manager.

        Rows of the argument tensor: 0 temperature (float32 bits), 1 top_p (float32 bits), 2 top_k,
        3 key, 4 position, 5 min_p (float32 bits). Requests carry a ``RequestSampling`` as
        ``logit_processor_kwargs={"govllm_sampling": ...}``.
        """

        KWARG = "govllm_sampling"
        ROWS = 6

        def __init__(self) -> None:
            from transformers.generation.logits_process import LogitsProcessorList

            super().__init__(LogitsProcessorList(), per_request_processors=False, drop_unsupported_processors=True)
            self.tensors_required = self.ROWS
            self.supported_keys = {self.KWARG: RequestSampling}
            self.ignored_keys = set()
            self.do_processing = True
            # Host-side summary of the batch last prepared (prepare and call alternate on one thread).
            self._any_sampled = True
            self._any_filtered = True
            self._any_min_p = True
            self._top_k_bound = 0  # the largest top_k of the filtered rows; 0 when one has no top_k
            self._plan: _Plan | None = None
            # Penalty history: host bookkeeping and the device pool ([slots, vocab] counts and prompt masks).
            self._slots = _PenaltySlots()
            self._counts: torch.Tensor | None = None
            self._prompt_seen: torch.Tensor | None = None
            # The manager's model runner, when CUDA graphs must be bypassed for planned batches.
            self._runner: Any = None
            self._graphs = (False, False)
            self.lora: Any = None  # lora.LoRARouter when the backend serves adapters

        def clear(self) -> None:  # never drop the sampler
            pass

        def bind_runner(self, runner: Any) -> bool:
            """Lets planned batches run eagerly when the manager replays CUDA graphs (a replay would skip
            this Python code). Returns whether planned batches are safe with this runner."""
            flags = compat.cuda_graph_flags(runner)
            if not any(flags):
                return True
            if not compat.can_toggle_cuda_graphs(runner):
                return False
            self._runner, self._graphs = runner, flags
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
            if self.lora is not None:  # the step's token spans per adapter, for lora.LoRARouter's hooks
                self.lora.observe(compat.batch_segments(requests_in_batch, self.KWARG))
            floats, ints = [], []
            any_sampled = any_filtered = any_min_p = unbounded = False
            bound = 0
            plan: _Plan | None = None
            for state, params, position in compat.batch_rows(requests_in_batch, self.KWARG):
                if params is None:  # the manager's warmup requests
                    floats.append((0.0, 1.0, 0.0))
                    ints.append((0, 0, position))
                    continue
                if params.temperature > 0:
                    any_sampled = True
                    any_min_p = any_min_p or params.min_p > 0
                    if params.top_k > 0 or params.top_p < 1.0:
                        any_filtered = True
                        bound = max(bound, params.top_k)
                        unbounded = unbounded or params.top_k <= 0
                if params.extras:
                    plan = plan or _Plan()
                    self._plan_row(plan, len(ints), state, position, params)
                floats.append((params.temperature, params.top_p, params.min_p))
                ints.append((params.top_k, params.key, position))
            self._any_sampled, self._any_filtered, self._any_min_p = any_sampled, any_filtered, any_min_p
            self._top_k_bound = 0 if unbounded else bound
            self._plan = plan
            self._slots.keep_only(set() if plan is None else set(plan.penalty_ids))
            self._gate_graphs(eager=plan is not None)
            if not ints:
                return arg_storage
            f = torch.tensor(floats, dtype=torch.float32).view(torch.int32).t()
            args = torch.cat([f[:2], torch.tensor(ints, dtype=torch.int32).t(), f[2:]], dim=0)
            arg_storage[: self.ROWS, : args.size(1)] = args.to(arg_storage.device)
            return arg_storage

        def _plan_row(self, plan: _Plan, row: int, state: Any, position: int, params: RequestSampling) -> None:
            """Adds one row's min_tokens mask, penalty history and logprob request to the batch plan."""
            generated = position - params.prompt_len  # output tokens before this one
            if params.min_tokens > generated and params.stop_ids:
                plan.mask_rows.extend([row] * len(params.stop_ids))
                plan.mask_tokens.extend(params.stop_ids)
            if params.penalised:
                request_id = compat.request_id(state)
                slot, rebuild = self._slots.take(request_id, generated)
                plan.penalty_rows.append(row)
                plan.penalty_ids.append(request_id)
                plan.penalty_slots.append(slot)
                plan.repetition.append(params.repetition_penalty)
                plan.presence.append(params.presence_penalty)
                plan.frequency.append(params.frequency_penalty)
                if rebuild:
                    tokens = compat.token_history(state)
                    prompt, output = tokens[: params.prompt_len], tokens[params.prompt_len :][:generated]
                    if len(output) < generated:
                        log.debug("request %s: %d of %d output tokens known for its penalties",
                                  request_id, len(output), generated)
                    plan.rebuild_slots.append(slot)
                    plan.prompt_slots.extend([slot] * len(prompt))
                    plan.prompt_tokens.extend(prompt)
                    plan.output_slots.extend([slot] * len(output))
                    plan.output_tokens.extend(output)
            if params.bias_ids:
                plan.bias_rows.extend([row] * len(params.bias_ids))
                plan.bias_tokens.extend(params.bias_ids)
                plan.bias_values.extend(params.bias_values)
            if params.allowed is not None:
                plan.allowed_rows.append(row)
                plan.allowed_pairs_rows.extend([row] * len(params.allowed))
                plan.allowed_pairs_tokens.extend(params.allowed)
            for word in params.bad_words:
                if len(word) == 1:  # always banned; longer words depend on the history (see _constrain)
                    plan.mask_rows.append(row)
                    plan.mask_tokens.append(word[0])
            if params.tracked:
                plan.tracked.append((row, params, generated, state))
                plan.any_grammar = plan.any_grammar or params.matcher is not None
            if params.logprobs is not None:
                plan.logprob_rows.append(row)
                plan.logprob_params.append(params)
                plan.logprob_index.append(generated)
                plan.top = max(plan.top, params.logprobs)

        def _gate_graphs(self, eager: bool) -> None:
            """CUDA graphs off for a planned batch, back on for the next plain one."""
            if self._runner is not None:
                compat.set_cuda_graph_flags(self._runner, self._graphs[0] and not eager,
                                            self._graphs[1] and not eager)

        def _search(self, scores: torch.Tensor) -> tuple[bool, int | None]:
            """(exact, candidates) for this batch's top-k/top-p, without a host sync: the largest top_k
            when every filtered row has one; else a full sort on CUDA, a growing candidate set on CPU."""
            if self._top_k_bound:
                return False, min(self._top_k_bound, scores.size(-1))
            return scores.is_cuda, None

        def __call__(self, input_ids, scores: torch.FloatTensor, logits_processor_args: torch.Tensor):
            capturing = scores.is_cuda and torch.cuda.is_current_stream_capturing()
            if capturing:  # a CUDA graph replays this for any batch: no host-side shortcuts
                return self.sample(scores, logits_processor_args, filtered=True, exact=True, min_p=True)
            if self._plan is not None:
                return self._call_planned(scores, logits_processor_args, self._plan)
            if not self._any_sampled:
                return scores
            exact, candidates = self._search(scores) if self._any_filtered else (False, None)
            return self.sample(scores, logits_processor_args, filtered=self._any_filtered, exact=exact,
                               min_p=self._any_min_p, candidates=candidates)

        @torch.compiler.disable  # host-side lists per batch: keep it out of any compiled forward
        def _call_planned(self, scores: torch.Tensor, args: torch.Tensor, plan: _Plan) -> torch.Tensor:
            owned = False
            if plan.tracked:
                self._follow(plan)
                if plan.any_grammar:
                    scores, owned = self._apply_grammar(scores, plan), True
            logits = self.planned_logits(scores, plan, owned=owned)
            exact, candidates = self._search(scores) if self._any_filtered else (False, None)
            chosen = self.choose(logits, args, sampled=self._any_sampled, filtered=self._any_filtered,
                                 exact=exact, min_p=self._any_min_p, candidates=candidates)
            if plan.tracked:
                self._advance(plan, chosen, logits)
            if plan.penalty_rows:
                self._count(plan, chosen)
            if plan.logprob_rows:
                self._record_logprobs(scores, chosen, plan)
            return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

        def planned_logits(self, scores: torch.Tensor, plan: _Plan, owned: bool = False) -> torch.Tensor:
            """The logits after a plan's allowed tokens, bad words, min_tokens mask, logit_bias and
            penalties (scores itself when it has none of them; in place when ``owned``)."""
            logits = scores
            if not owned and (plan.mask_rows or plan.penalty_rows or plan.bias_rows or plan.allowed_rows):
                logits = scores.clone()
            device = scores.device
            if plan.allowed_rows:
                keep = torch.zeros_like(logits, dtype=torch.bool)
                keep[torch.tensor(plan.allowed_pairs_rows, device=device),
                     torch.tensor(plan.allowed_pairs_tokens, device=device)] = True
                rows = torch.zeros(logits.size(0), 1, dtype=torch.bool, device=device)
                rows[torch.tensor(plan.allowed_rows, device=device)] = True
                logits.masked_fill_(rows & ~keep, float("-inf"))
            if plan.mask_rows:
                rows = torch.tensor(plan.mask_rows, device=device)
                tokens = torch.tensor(plan.mask_tokens, device=device)
                logits[rows, tokens] = float("-inf")
            if plan.bias_rows:
                rows = torch.tensor(plan.bias_rows, device=device)
                tokens = torch.tensor(plan.bias_tokens, device=device)
                values = torch.tensor(plan.bias_values, dtype=logits.dtype, device=device)
                logits.index_put_((rows, tokens), values, accumulate=True)
            if plan.penalty_rows:
                self._apply_penalties(logits, plan)
            return logits

        @staticmethod
        def _follow(plan: _Plan) -> None:
            """Brings each followed row's history (and matcher) to the row's position, and adds the
            bad words its history completes to the plan's mask."""
            for row, params, generated, state in plan.tracked:
                history = params.history
                if len(history) != generated:
                    matcher = params.matcher
                    if len(history) > generated:  # the manager discarded tokens: roll them back
                        if matcher is not None:
                            compat.rollback(matcher, len(history) - generated)
                        del history[generated:]
                    else:  # the manager rebuilt the request: replay its outputs
                        tokens = compat.token_history(state)[params.prompt_len:][:generated]
                        if matcher is not None:
                            matcher.reset()
                            for token in tokens:
                                if not matcher.accept_token(token):
                                    log.warning("request %s: replaying token %d: the grammar rejects it",
                                                compat.request_id(state), token)
                                    break
                        history[:] = tokens
                for word in params.bad_words:
                    n = len(word) - 1
                    if 0 < n <= len(history) and tuple(history[-n:]) == word[:-1]:
                        plan.mask_rows.append(row)
                        plan.mask_tokens.append(word[-1])

        @staticmethod
        def _apply_grammar(scores: torch.Tensor, plan: _Plan) -> torch.Tensor:
            """A copy of scores with each grammar row's disallowed tokens at -inf (a matcher that is
            already terminated allows only its stop tokens)."""
            bitmask = compat.allocate_bitmask(scores.size(0), scores.size(-1))
            rows = []
            for row, params, _, _ in plan.tracked:
                matcher = params.matcher
                if matcher is None:
                    continue
                if matcher.is_terminated():
                    plan.allowed_rows.append(row)
                    plan.allowed_pairs_rows.extend([row] * len(params.grammar_stops))
                    plan.allowed_pairs_tokens.extend(params.grammar_stops)
                    continue
                matcher.fill_next_token_bitmask(bitmask, row)
                rows.append(row)
            logits = scores.clone()
            if rows:
                compat.apply_bitmask(logits, bitmask.to(logits.device, non_blocking=True), rows)
            return logits

        @staticmethod
        def _advance(plan: _Plan, chosen: torch.Tensor, logits: torch.Tensor) -> None:
            """Feeds each followed row's chosen token to its matcher and history (the host sync of a
            constrained batch). A token the matcher refuses (only possible when the row had nothing
            allowed left, e.g. allowed_token_ids against the grammar) is replaced by the row's best
            allowed token, else a stop token, so the grammar's state stays consistent."""
            rows = [row for row, _, _, _ in plan.tracked]
            picks = chosen[torch.tensor(rows, device=chosen.device)].view(-1).tolist()
            for (row, params, _, state), token in zip(plan.tracked, picks):
                matcher = params.matcher
                if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token):
                    fallback = int(logits[row].argmax())
                    if not matcher.accept_token(fallback):
                        fallback = params.grammar_stops[0] if params.grammar_stops else fallback
                        log.warning("request %s: no token allowed by its grammar and other constraints: "
                                    "stopping", compat.request_id(state))
                    chosen[row, 0] = fallback
                    token = fallback
                params.history.append(token)

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
            """log_softmax of the raw logits (vLLM's default raw_logprobs; grammar-masked for a constrained
            row, as vLLM masks before its sampler): the picked token's, its rank
            and the top alternatives', handed to each request's records. The one host sync of a planned
            batch."""
            rows = torch.tensor(plan.logprob_rows, dtype=torch.int64, device=raw.device)
            logprobs = torch.log_softmax(raw.index_select(0, rows).float(), dim=-1)
            picked = chosen.index_select(0, rows)
            values = logprobs.gather(-1, picked)
            ids = torch.cat([(logprobs >= values).sum(dim=-1, keepdim=True), picked], dim=-1)  # rank, token
            if plan.top:
                top_values, top_ids = logprobs.topk(plan.top, dim=-1, sorted=True)
                values, ids = torch.cat([values, top_values], dim=-1), torch.cat([ids, top_ids], dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for params, index, v, i in zip(plan.logprob_params, plan.logprob_index, values, ids):
                n = params.logprobs + 1
                params.records.append(LogprobRecord(index, i[1], v[0], tuple(i[2:n + 1]), tuple(v[1:n]), i[0]))

        @classmethod
        def sample(cls, scores: torch.Tensor, args: torch.Tensor, filtered: bool = True, exact: bool = False,
                   min_p: bool = True, candidates: int | None = None) -> torch.Tensor:
            """Returns scores that are -inf except at each row's chosen token."""
            chosen = cls.choose(scores, args, filtered=filtered, exact=exact, min_p=min_p, candidates=candidates)
            return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

        @staticmethod
        def choose(scores: torch.Tensor, args: torch.Tensor, sampled: bool = True, filtered: bool = True,
                   exact: bool = False, min_p: bool = True, candidates: int | None = None) -> torch.Tensor:
            """Each row's token, [rows, 1]: the argmax for greedy rows, else a draw.

            ``sampled``: some row samples. ``filtered``: some row may use top-k/top-p. ``min_p``: some
            row may use min_p. ``exact``: sort the whole vocabulary. ``candidates``: a candidate set
            known to hold every row's kept tokens (see ``kept_candidates``).
            """
            greedy = scores.argmax(dim=-1, keepdim=True)
            if not sampled:
                return greedy
            vocab = scores.size(-1)
            logits, is_sampled = scaled_logits(scores, args, min_p)
            args = args[:, : scores.size(0)]
            target = _uniform(args[3], args[4]).unsqueeze(-1)  # [B, 1] in [0, 1)
            log_total = torch.logsumexp(logits, dim=-1, keepdim=True)

            # Plain temperature sampling: inverse CDF over the vocabulary in its own order.
            cdf = (logits - log_total).exp_().cumsum_(dim=-1)
            pick = torch.searchsorted(cdf, target * cdf[:, -1:], right=True).clamp_(max=vocab - 1)

            if filtered:
                # Top-k / top-p: inverse CDF over the kept candidates, in descending order.
                row_filtered, order, kept = kept_candidates(logits, log_total, args, is_sampled, exact, candidates)
                kept_cdf = kept.cumsum_(dim=-1)
                chosen = torch.searchsorted(kept_cdf, target * kept_cdf[:, -1:], right=True)
                chosen = order.gather(-1, chosen.clamp_(max=order.size(-1) - 1))
                pick = torch.where(row_filtered.unsqueeze(-1), chosen, pick)

            return torch.where(is_sampled.unsqueeze(-1), pick, greedy)

    return PerRequestSampler

