"""The transformers backend on the default model (SmolLM2-135M-Instruct), on CPU or CUDA.

One backend for the whole session (loading costs seconds); every test drives it on the session's
event loop. Set GOVLLM_TEST_CONCURRENCY=64 for the full acceptance check of batch invariance (64
concurrent greedy requests against their solo outputs, ~2 minutes on 2 cores); the default, 12,
keeps the file short. GOVLLM_TEST_MODEL, GOVLLM_TEST_DEVICE and GOVLLM_TEST_DTYPE override the
model directory, the device and the dtype (float32 by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from govllm.backend import Delta, EngineConfig, EngineDeadError, RequestError, SamplingParams
from govllm.backends import hf_transformers
from helpers import _collect, collect, gather_watching, greedy

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
TOPICS = [
    "cats", "dogs", "the sea", "mountains", "Paris", "coffee", "trains", "the moon",
    "bees", "winter", "music", "chess", "rivers", "bread", "robots", "volcanoes",
]
CONCURRENCY = int(os.environ.get("GOVLLM_TEST_CONCURRENCY", "12"))
REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def backend(model_path, loop):
    # float32 by default, also on CUDA: batch invariance of greedy decoding is only meaningful there
    # (GOVLLM_TEST_DTYPE=auto runs the suite in bfloat16 on CUDA).
    cfg = EngineConfig(model=model_path, max_num_seqs=64, seed=1234, device=os.environ.get("GOVLLM_TEST_DEVICE", ""),
                       dtype=os.environ.get("GOVLLM_TEST_DTYPE", "float32"))
    b = hf_transformers.create(cfg)
    t0 = time.perf_counter()
    loop.run_until_complete(b.start())
    print(f"\n[transformers backend] started in {time.perf_counter() - t0:.1f}s on {b.device}, "
          f"attention {b.model.config._attn_implementation}, max_model_len {b.max_model_len()}")
    yield b
    loop.run_until_complete(b.shutdown())


def topic_prompt(backend, i):
    return backend.apply_chat_template(
        [{"role": "user", "content": f"Tell me {i // len(TOPICS) + 1} facts about {TOPICS[i % len(TOPICS)]}."}]
    )


async def _wait_released(backend, request_id, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not backend.engine_holds(request_id):
            return True
        await asyncio.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- basics


def test_health_and_surface(backend):
    backend.health()
    assert backend.name == "transformers"
    assert backend.max_model_len() > 100
    ids = backend.apply_chat_template(PARIS)
    assert ids and all(isinstance(t, int) for t in ids)
    assert backend.encode("Hello world") == backend.tokenizer("Hello world")["input_ids"]


def test_chat_capital_of_france(loop, backend):
    out = collect(loop, backend, backend.apply_chat_template(PARIS), greedy(20), "paris")[0]
    assert "Paris" in out["text"], out
    assert out["finish"] in ("stop", "length")
    assert out["deltas"] >= 2, "expected streaming deltas"
    # the EOS token is reported in token_ids but not in the text
    assert backend.decode(out["ids"]).strip() == out["text"].strip()


def test_greedy_is_deterministic(loop, backend):
    prompt = topic_prompt(backend, 3)
    a = collect(loop, backend, prompt, greedy(16), "det-a")[0]
    b = collect(loop, backend, prompt, greedy(16), "det-b")[0]
    assert a["ids"] == b["ids"] and a["text"] == b["text"]
    assert len(a["ids"]) == 16


def test_concurrent_requests_match_solo(loop, backend):
    n = CONCURRENCY
    prompts = [topic_prompt(backend, i) for i in range(n)]
    t0 = time.perf_counter()
    solo = [collect(loop, backend, p, greedy(16), f"solo-{i}")[0]["ids"] for i, p in enumerate(prompts)]
    t_solo = time.perf_counter() - t0

    scheduler = backend.manager.batch_processor.scheduler
    t0 = time.perf_counter()
    together_out, max_in_flight = gather_watching(
        loop, [_collect(backend, p, greedy(16), f"conc-{i}") for i, p in enumerate(prompts)],
        lambda: len(scheduler.active_requests))
    t_conc = time.perf_counter() - t0
    print(f"\n[batch invariance] {n} prompts: solo {t_solo:.1f}s, concurrent {t_conc:.1f}s, "
          f"max requests in one batch {max_in_flight}")
    diverged = [
        (i, solo[i], together_out[i][0]["ids"]) for i in range(n) if together_out[i][0]["ids"] != solo[i]
    ]
    assert not diverged, f"state divergence under concurrency: {diverged[:3]}"
    assert max_in_flight >= n // 2, "requests did not run together"


# ----------------------------------------------------------------------------- finish reasons


def test_max_tokens_gives_length(loop, backend):
    out = collect(loop, backend, topic_prompt(backend, 5), greedy(3), "len")[0]
    assert out["finish"] == "length" and len(out["ids"]) == 3


def test_eos_gives_stop_and_ignore_eos(loop, backend):
    prompt = backend.apply_chat_template(PARIS)
    base = collect(loop, backend, prompt, greedy(30), "eos")[0]
    assert base["finish"] == "stop" and base["ids"][-1] in backend.eos_token_ids, base
    n = len(base["ids"])
    more = collect(loop, backend, prompt, greedy(n + 3, ignore_eos=True), "ignore-eos")[0]
    assert more["finish"] == "length" and len(more["ids"]) == n + 3
    assert more["ids"][:n] == base["ids"]


def test_stop_string_is_truncated(loop, backend):
    prompt = backend.apply_chat_template(PARIS)
    full = collect(loop, backend, prompt, greedy(20), "stop-full")[0]
    assert "Paris" in full["text"]
    out = collect(loop, backend, prompt, greedy(20, stop=["Paris"]), "stop-str")[0]
    assert out["finish"] == "stop"
    assert "Paris" not in out["text"]
    assert out["text"] == full["text"][: full["text"].index("Paris")]
    # the stop string cancelled the request in the manager
    assert loop.run_until_complete(_wait_released(backend, "stop-str"))


def test_stop_string_at_start(loop, backend):
    prompt = backend.apply_chat_template(PARIS)
    full = collect(loop, backend, prompt, greedy(8), "stop-start-full")[0]
    first_word = full["text"].split()[0]
    out = collect(loop, backend, prompt, greedy(8, stop=[first_word]), "stop-start")[0]
    assert out["finish"] == "stop" and out["text"] == ""


def test_stop_token_ids(loop, backend):
    prompt = backend.apply_chat_template(PARIS)
    full = collect(loop, backend, prompt, greedy(10), "stoptok-full")[0]
    target = full["ids"][2]
    out = collect(loop, backend, prompt, greedy(10, stop_token_ids=[target]), "stoptok")[0]
    assert out["finish"] == "stop"
    assert out["ids"] == full["ids"][:3]  # the stop token is reported...
    assert out["text"] == backend.decode(full["ids"][:2])  # ...but its text is not


def test_context_full_gives_length(loop, backend, monkeypatch):
    prompt = topic_prompt(backend, 1)
    monkeypatch.setattr(backend, "_max_model_len", len(prompt) + 4)
    out = collect(loop, backend, prompt, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True), "ctx")[0]
    assert out["finish"] == "length" and len(out["ids"]) == 4


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(loop, backend):
    prompt = topic_prompt(backend, 7)
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    a = collect(loop, backend, prompt, sp, "seed-a")[0]

    async def with_neighbours():
        others = [
            _collect(backend, topic_prompt(backend, 20 + i), SamplingParams(max_tokens=12, temperature=0.8), f"nb-{i}")
            for i in range(3)
        ]
        res = await asyncio.gather(_collect(backend, prompt, sp, "seed-b"), *others)
        return res[0]

    b = loop.run_until_complete(with_neighbours())[0]
    assert a["ids"] == b["ids"], "the same seed must give the same tokens, whatever runs beside it"
    c = collect(loop, backend, prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=43), "seed-c")[0]
    assert c["ids"] != a["ids"]


def test_top_k_one_and_tiny_top_p_are_greedy(loop, backend):
    prompt = topic_prompt(backend, 9)
    ref = collect(loop, backend, prompt, greedy(10), "ref")[0]["ids"]
    k1 = collect(loop, backend, prompt, SamplingParams(max_tokens=10, temperature=1.5, top_k=1), "k1")[0]["ids"]
    p0 = collect(loop, backend, prompt, SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6), "p0")[0]["ids"]
    assert k1 == ref and p0 == ref


def test_sampler_distribution():
    """The tensor sampler itself: frequencies follow softmax(logits / T) within top-k/top-p."""
    import torch

    sampler = hf_transformers._build_sampler_class()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    rows = 4000

    def args(t, p, k, min_p=0.0):
        a = torch.zeros(6, rows, dtype=torch.int32)
        a[0] = torch.full((rows,), t, dtype=torch.float32).view(torch.int32)
        a[1] = torch.full((rows,), p, dtype=torch.float32).view(torch.int32)
        a[2] = k
        a[3] = 7
        a[4] = torch.arange(rows, dtype=torch.int32)
        a[5] = torch.full((rows,), min_p, dtype=torch.float32).view(torch.int32)
        return a

    def freqs(t, p, k, min_p=0.0):
        out = sampler.sample(logits, args(t, p, k, min_p))
        picks = out.argmax(-1)
        assert torch.isinf(out).sum() == rows * 3  # exactly one finite score per row
        return torch.bincount(picks, minlength=4).float() / rows

    f = freqs(1.0, 1.0, 0)
    assert torch.allclose(f, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), f
    f = freqs(1.0, 1.0, 2)
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03), f
    f = freqs(1.0, 0.7, 0)  # smallest prefix reaching 0.7: tokens 0 and 1
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.625) < 0.03, f
    f = freqs(0.0, 1.0, 0)  # greedy row
    assert f[0] == 1.0
    # min_p is relative to the most likely token, after temperature: at T=1, 0.5 keeps p >= 0.25
    # (tokens 0 and 1); at T=2 the probabilities are sqrt-flattened to [.38, .29, .21, .12] and it
    # keeps tokens 0-2, renormalised.
    f = freqs(1.0, 1.0, 0, min_p=0.5)
    assert torch.allclose(f, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03), f
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    f = freqs(2.0, 1.0, 0, min_p=0.5)
    assert f[3] == 0 and torch.allclose(f[:3], flat[:3] / flat[:3].sum(), atol=0.03), f
    assert (freqs(5.0, 1.0, 0, min_p=1.0) == torch.tensor([1.0, 0, 0, 0])).all()

    # The growing candidate set (CPU / eager path) picks exactly what a full sort (graph path) picks.
    wide = torch.randn(64, 5000) * 2.0
    a = torch.zeros(6, 64, dtype=torch.int32)
    a[0] = torch.linspace(0.0, 1.5, 64).view(torch.int32)
    a[1] = torch.tensor([1.0, 0.5, 0.95, 0.999] * 16).view(torch.int32)
    a[2] = torch.tensor([0, 0, 5, 0, 300, 0, 0, 0] * 8, dtype=torch.int32)
    a[3] = torch.arange(64, dtype=torch.int32) * 7919
    a[4] = 11
    fast = sampler.sample(wide, a, filtered=True, exact=False).argmax(-1)
    full = sampler.sample(wide, a, filtered=True, exact=True).argmax(-1)
    assert torch.equal(fast, full)


def test_n_choices(loop, backend):
    prompt = topic_prompt(backend, 11)
    out = collect(loop, backend, prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3), "multi")
    assert sorted(out) == [0, 1, 2]
    assert all(c["finish"] in ("stop", "length") for c in out.values())
    again = collect(loop, backend, prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3), "multi2")
    assert [again[i]["ids"] for i in range(3)] == [out[i]["ids"] for i in range(3)]


# ----------------------------------------------------------------------------- abort and errors


def test_abort_mid_stream(loop, backend):
    async def scenario():
        deltas = []
        async for d in backend.generate(topic_prompt(backend, 2), greedy(200, ignore_eos=True), "abort-me"):
            deltas.append(d)
            if len(deltas) == 3:
                await backend.abort("abort-me")
        return deltas

    deltas = loop.run_until_complete(scenario())
    assert deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 200
    assert loop.run_until_complete(_wait_released(backend, "abort-me")), "manager still holds the aborted request"
    # outputs of the step that ran while the abort was in flight do not pile up in the manager
    loop.run_until_complete(asyncio.sleep(3 * hf_transformers.WATCHDOG_INTERVAL_S))
    assert backend.manager.output_router.output_queue.empty()


def test_cancelling_the_consumer_cancels_the_request(loop, backend):
    async def scenario():
        started = asyncio.Event()

        async def consume():
            async for _ in backend.generate(topic_prompt(backend, 4), greedy(200, ignore_eos=True), "cancel-me"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert backend.engine_holds("cancel-me")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _wait_released(backend, "cancel-me")

    assert loop.run_until_complete(scenario()), "manager still holds the cancelled request"
    # and the engine still serves
    assert collect(loop, backend, topic_prompt(backend, 4), greedy(2), "after-cancel")[0]["finish"] == "length"


def test_context_length_error(loop, backend):
    limit = backend.max_model_len()
    prompt = topic_prompt(backend, 0)
    with pytest.raises(RequestError) as err:
        collect(loop, backend, prompt, greedy(limit), "too-long")
    msg = str(err.value)
    assert f"maximum context length is {limit} tokens" in msg
    assert f"you requested {len(prompt) + limit} tokens ({len(prompt)} in the messages, {limit} in the completion)" in msg
    assert err.value.status == 400
    with pytest.raises(RequestError, match="maximum context length"):
        collect(loop, backend, [1] * limit, SamplingParams(max_tokens=None), "too-long-2")


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=4, top_p=0.0),
        SamplingParams(max_tokens=4, temperature=-1.0),
        SamplingParams(max_tokens=0),
        SamplingParams(max_tokens=4, top_k=-2),
    ],
)
def test_invalid_sampling(loop, backend, sampling):
    with pytest.raises(RequestError):
        collect(loop, backend, [1, 2, 3], sampling, "bad")


def test_bad_prompts(loop, backend):
    with pytest.raises(RequestError, match="empty"):
        collect(loop, backend, [], greedy(2), "empty")
    with pytest.raises(RequestError, match="out of vocabulary"):
        collect(loop, backend, [1, 10**9], greedy(2), "oov")


def test_engine_death_is_reported(loop, backend, monkeypatch):
    monkeypatch.setattr(backend, "_death_reason", lambda: "simulated")
    try:
        with pytest.raises(EngineDeadError, match="simulated"):
            backend.health()
    finally:
        backend._dead = None  # health() remembers a death; forget the simulated one


# ----------------------------------------------------------------------------- throughput (printed)


def test_throughput(loop, backend):
    async def run(n: int, max_tokens: int) -> tuple[int, float]:
        prompts = [topic_prompt(backend, 30 + i) for i in range(n)]
        sp = greedy(max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[_collect(backend, p, sp, f"tp-{n}-{i}") for i, p in enumerate(prompts)])
        return sum(len(o[0]["ids"]) for o in outs), time.perf_counter() - t0

    lines = []
    for n, max_tokens in ((1, 32), (16, 32)):
        tokens, seconds = loop.run_until_complete(run(n, max_tokens))
        assert tokens == n * max_tokens
        lines.append(f"{n:>2} stream(s): {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} tok/s")
    print(f"\n[throughput on {backend.device}, prefill included]\n  " + "\n  ".join(lines))


def test_engine_death_fails_requests(loop, model_path):
    """A crash of the manager's loop fails the running request with EngineDeadError, then health() too."""
    cfg = EngineConfig(model=model_path, max_model_len=256, seed=1, dtype="float32",
                       device=os.environ.get("GOVLLM_TEST_DEVICE", ""), extra={"kv_cache_gib": 0.05})
    b = hf_transformers.create(cfg)
    loop.run_until_complete(b.start())
    try:
        assert b.max_model_len() == 256
        b.health()

        def broken_forward(*args, **kwargs):
            raise RuntimeError("simulated device failure")

        b.model.forward = broken_forward
        with pytest.raises(EngineDeadError):
            collect(loop, b, [1, 2, 3, 4], greedy(4), "doomed")
        with pytest.raises(EngineDeadError):
            b.health()
        with pytest.raises(EngineDeadError):
            collect(loop, b, [1, 2, 3, 4], greedy(4), "after-death")
    finally:
        loop.run_until_complete(b.shutdown())
    with pytest.raises(EngineDeadError, match="shut down"):
        b.health()


# ----------------------------------------------------------------------------- penalties, min_tokens, logprobs (unit)


def _fake_request(request_id, params, prompt, generated):
    """What PerRequestSampler reads of a manager request about to predict output token len(generated)."""
    state = SimpleNamespace(request_id=request_id, logit_processor_kwargs={"govllm_sampling": params},
                            initial_tokens=list(prompt), generated_tokens=list(generated),
                            position_offset=len(prompt) + len(generated))
    return SimpleNamespace(has_new_token=True, state=state)


def test_sampler_penalties_min_tokens_and_logprobs():
    """The planned path on synthetic logits: vLLM's penalty formulas, token history kept on the device
    across steps (and rebuilt after a gap), min_tokens masking, raw logprobs."""
    import torch

    sampler = hf_transformers._build_sampler_class()()
    storage = torch.zeros(sampler.ROWS, 8, dtype=torch.int32)
    sampler.fill_defaults(storage)
    raw = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]] * 3)
    rep = hf_transformers.RequestSampling(repetition_penalty=2.0, prompt_len=2)
    freq = hf_transformers.RequestSampling(frequency_penalty=0.5, presence_penalty=1.0, prompt_len=2)
    mins = hf_transformers.RequestSampling(min_tokens=3, stop_ids=(3, 5), logprobs=2, prompt_len=2)
    step = [
        _fake_request("rep", rep, [0, 1], [4]),  # tokens seen: 0, 1 (prompt), 4 (output)
        _fake_request("freq", freq, [0, 1], [2, 2, 4]),  # output counts: 2 twice, 4 once (prompt ignored)
        _fake_request("min", mins, [0, 1], [0]),  # one output token: 3 and 5 stay masked
    ]
    sampler.prepare_tensor_args(step, storage)
    plan = sampler._plan
    assert plan.rebuild_slots == [0, 1]  # first sight: histories rebuilt from the request states
    logits = raw.clone()
    sampler._apply_penalties(logits, plan)
    assert logits[0].tolist() == [1.0, -2.0, 0.5, 3.0, -4.0, 1.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5 - 1.0 - 1.0, 3.0, -2.0 - 0.5 - 1.0, 1.0]
    assert logits[2].tolist() == raw[2].tolist()

    chosen = sampler(None, raw.clone(), storage).argmax(-1).tolist()
    assert chosen[:2] == [3, 3]  # greedy over the penalised logits
    assert chosen[2] == 0  # 3 and 5 are masked: the next best
    record = mins.records.popleft()
    expected = torch.log_softmax(raw[2], -1)  # raw logits: the mask does not change the logprobs
    assert record.index == 1 and record.token == 0
    assert abs(record.logprob - expected[0].item()) < 1e-6
    assert record.top_ids == (3, 0) and abs(record.top_logprobs[0] - expected[3].item()) < 1e-6

    # Next step: the picks (3) were counted on the device, so the histories are reused as they are.
    step2 = [
        _fake_request("rep", rep, [0, 1], [4, 3]),
        _fake_request("freq", freq, [0, 1], [2, 2, 4, 3]),
    ]
    sampler.prepare_tensor_args(step2, storage)
    plan = sampler._plan
    assert plan.rebuild_slots == []
    logits = raw[:2].clone()
    sampler._apply_penalties(logits, plan)
    assert logits[0, 3].item() == 1.5 and logits[1, 3].item() == 3.0 - 0.5 - 1.0

    # A gap (a batch without "rep") frees its slot; when it comes back its history is rebuilt.
    sampler.prepare_tensor_args([step2[1]], storage)
    sampler(None, raw[:1].clone(), storage)
    sampler.prepare_tensor_args([_fake_request("rep", rep, [0, 1], [4, 3, 1])], storage)
    assert sampler._plan.rebuild_slots and sampler._plan.output_tokens == [4, 3, 1]
    # min_tokens reached: nothing masked any more
    sampler.prepare_tensor_args([_fake_request("min", mins, [0, 1], [0, 0, 0])], storage)
    assert sampler._plan.mask_rows == [] and sampler._plan.logprob_rows == [0]


# ----------------------------------------------------------------------------- penalties, min_tokens, min_p, logprobs


@pytest.fixture(scope="session")
def ref_model(model_path):
    """The same checkpoint outside the manager, for reference forwards (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def reference_logits(ref_model, tokens):
    """Raw next-token logits after each prefix of tokens: [len(tokens), vocab]."""
    import torch

    with torch.no_grad():
        return ref_model(torch.tensor([tokens])).logits[0].float()


def reference_greedy(ref_model, prompt, n, repetition=1.0, presence=0.0, frequency=0.0):
    """Greedy decoding with vLLM's penalty semantics, written out independently of the sampler."""
    import torch

    out: list[int] = []
    for _ in range(n):
        logits = reference_logits(ref_model, prompt + out)[-1]
        vocab = logits.size(0)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab)[:vocab].float()
        seen = (counts > 0) | torch.isin(torch.arange(vocab), torch.tensor(prompt))
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits) - frequency * counts - presence * (counts > 0).float()
        out.append(int(logits.argmax()))
    return out


def _run_together(loop, backend, jobs):
    """Runs (prompt, sampling, request_id) jobs concurrently; returns their outputs in order."""
    async def run():
        return await asyncio.gather(*[_collect(backend, p, sp, rid) for p, sp, rid in jobs])

    return [o[0] for o in loop.run_until_complete(run())]


def test_penalties_match_reference(loop, backend, ref_model):
    """Greedy with each penalty gives vLLM's tokens (an independent reference loop), changes the
    plain greedy continuation (so a penalty that is ignored fails), and stays deterministic."""
    prompt = backend.encode("one two three one two three one two three one two")
    n = 12
    cases = {
        "plain": {},
        "repetition": {"repetition_penalty": 1.3},
        "presence": {"presence_penalty": 1.5},
        "frequency": {"frequency_penalty": 1.0},
    }
    jobs = [(prompt, greedy(n, ignore_eos=True, **kw), f"pen-{name}") for name, kw in cases.items()]
    jobs.append((prompt, greedy(n, ignore_eos=True, repetition_penalty=1.3), "pen-repetition-again"))
    outs = {name: o["ids"] for name, o in zip(list(cases) + ["again"], _run_together(loop, backend, jobs))}
    plain = outs["plain"]
    assert len(set(plain)) < len(plain), f"the plain greedy continuation should repeat: {plain}"
    assert outs["again"] == outs["repetition"]
    for name, kw in cases.items():
        ref = reference_greedy(ref_model, prompt, n, kw.get("repetition_penalty", 1.0),
                               kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0))
        assert outs[name] == ref, (name, outs[name], ref)
        if name != "plain":
            assert outs[name] != plain, f"{name} changed nothing"


def test_min_tokens_holds_back_eos_and_stop_tokens(loop, backend):
    """EOS and stop_token_ids cannot be sampled before min_tokens tokens (so the request runs past
    where greedy would stop); before that, greedy is unchanged."""
    prompt = backend.apply_chat_template(PARIS)
    base = collect(loop, backend, prompt, greedy(30), "mint-base")[0]
    assert base["finish"] == "stop"
    n = len(base["ids"])  # EOS comes at n
    stop_token = base["ids"][1]
    first_word = base["text"].split()[0]
    outs = _run_together(loop, backend, [
        (prompt, greedy(n + 8, min_tokens=n + 4), "mint-eos"),
        (prompt, greedy(8, min_tokens=4, stop_token_ids=[stop_token]), "mint-stop"),
        (prompt, greedy(6, min_tokens=3, stop=[first_word]), "mint-stop-string"),
    ])
    eos_out, stop_out, string_out = outs
    # as in vLLM, a stop string in the text of the first min_tokens tokens does not stop the request
    assert string_out["text"].startswith(first_word), string_out
    assert len(eos_out["ids"]) >= n + 4, eos_out
    assert not set(eos_out["ids"][: n + 4]) & set(backend.eos_token_ids), eos_out
    assert eos_out["ids"][: n - 1] == base["ids"][: n - 1]
    assert stop_token not in stop_out["ids"][:4] and len(stop_out["ids"]) >= 4, stop_out


def test_min_p_one_is_greedy_at_high_temperature(loop, backend):
    prompt = topic_prompt(backend, 13)
    outs = _run_together(loop, backend, [
        (prompt, greedy(10, ignore_eos=True), "minp-ref"),
        (prompt, SamplingParams(max_tokens=10, temperature=5.0, seed=3, min_p=1.0, ignore_eos=True), "minp-1"),
        (prompt, SamplingParams(max_tokens=10, temperature=5.0, seed=3, ignore_eos=True), "minp-0"),
    ])
    assert outs[1]["ids"] == outs[0]["ids"]
    assert outs[2]["ids"] != outs[0]["ids"], "temperature 5 without min_p should not be greedy"


def test_logprobs_are_raw_log_softmax(loop, backend, ref_model):
    """Each token's logprob is log_softmax of the model's raw logits (not after temperature or
    penalties), top_logprobs are sorted and start with the greedy token, entries are shaped as the
    vLLM backend shapes them (one per token of each delta)."""
    import torch

    prompt = backend.apply_chat_template(PARIS)
    sampled = SamplingParams(max_tokens=6, temperature=0.7, seed=11, logprobs=2, repetition_penalty=1.2,
                             ignore_eos=True)

    async def run(sampling, request_id):
        ids, entries = [], []
        async for d in backend.generate(prompt, sampling, request_id):
            assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
            ids += d.token_ids
            entries += d.logprobs
        return ids, entries

    async def together():
        return await asyncio.gather(run(greedy(6, logprobs=5, ignore_eos=True), "lp-greedy"),
                                    run(sampled, "lp-sampled"), run(greedy(3, logprobs=0), "lp-zero"))

    (ids, entries), (sampled_ids, sampled_entries), (_, zero_entries) = loop.run_until_complete(together())
    assert ids == collect(loop, backend, prompt, greedy(6, ignore_eos=True), "lp-plain")[0]["ids"]
    ref = torch.log_softmax(reference_logits(ref_model, prompt + ids)[len(prompt) - 1:-1], -1)
    for i, (token, entry) in enumerate(zip(ids, entries)):
        assert entry["token"] == backend.tokenizer.decode([token])
        assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
        assert abs(entry["logprob"] - ref[i, token].item()) < 1e-3, (i, entry["logprob"], ref[i, token])
        top = entry["top"]
        assert len(top) == 5
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and abs(top[0]["logprob"] - entry["logprob"]) < 1e-6
        assert all(abs(t["logprob"] - r.item()) < 1e-3 for t, r in zip(top, ref[i].topk(5).values))
    assert zero_entries and all(e["top"] == [] for e in zero_entries)

    # sampled at temperature 0.7 with a penalty: still the raw logprobs of the sampled tokens
    ref = torch.log_softmax(reference_logits(ref_model, prompt + sampled_ids)[len(prompt) - 1:-1], -1)
    assert sampled_ids != ids
    for i, (token, entry) in enumerate(zip(sampled_ids, sampled_entries)):
        assert abs(entry["logprob"] - ref[i, token].item()) < 1e-3, (i, entry, ref[i, token])
        assert len(entry["top"]) == 2


# ----------------------------------------------------------------------------- scheduling


def test_request_admitted_mid_batch_matches_solo(loop, backend):
    """A request that joins while others are decoding gives its solo greedy tokens."""
    late_prompt = topic_prompt(backend, 40)
    solo = collect(loop, backend, late_prompt, greedy(16, ignore_eos=True), "late-solo")[0]["ids"]

    async def scenario():
        progress = {i: 0 for i in range(4)}

        async def long_one(i):
            out = []
            async for d in backend.generate(topic_prompt(backend, 41 + i), greedy(40, ignore_eos=True), f"early-{i}"):
                out += d.token_ids
                progress[i] = len(out)
            return out

        early = [asyncio.create_task(long_one(i)) for i in range(4)]
        while min(progress.values()) < 6:
            await asyncio.sleep(0.01)
        running = sum(1 for t in early if not t.done())
        late = await _collect(backend, late_prompt, greedy(16, ignore_eos=True), "late")
        await asyncio.gather(*early)
        return running, min(progress.values()), late[0]["ids"]

    running, _, late = loop.run_until_complete(scenario())
    assert running == 4, "the early requests should still be decoding when the late one arrives"
    assert late == solo


@pytest.fixture(scope="module")
def small_cache_backend(model_path, loop):
    """A KV cache of 9 blocks of 16 tokens (the minimum for max_model_len 128): 144 tokens in all."""
    cfg = EngineConfig(model=model_path, max_model_len=128, seed=1, dtype="float32",
                       device=os.environ.get("GOVLLM_TEST_DEVICE", ""), extra={"num_blocks": 1, "page_size": 16})
    b = hf_transformers.create(cfg)
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.shutdown())


def test_full_cache_requests_wait_and_finish(loop, small_cache_backend):
    """With more requests than the cache holds, they wait (or are preempted) and all finish with
    their solo greedy tokens (penalised ones too: their token history survives preemption)."""
    b = small_cache_backend
    n_tokens = 16
    prompts = [topic_prompt(b, 50 + i) for i in range(6)]
    # Half of them with penalties: preemption then rebuilds their token history from the request state.
    samplings = [greedy(n_tokens, ignore_eos=True, **({"repetition_penalty": 1.3, "frequency_penalty": 0.5}
                                                      if i in (0, 3, 5) else {})) for i in range(len(prompts))]
    capacity = b._num_blocks * b._page_size
    needed = sum(len(p) + n_tokens for p in prompts)
    assert needed > 2 * capacity, (needed, capacity)
    solo = [collect(loop, b, p, sp, f"full-solo-{i}")[0]["ids"] for i, (p, sp) in enumerate(zip(prompts, samplings))]

    scheduler = b.manager.batch_processor.scheduler
    outs, max_waiting = gather_watching(
        loop, [_collect(b, p, sp, f"full-{i}") for i, (p, sp) in enumerate(zip(prompts, samplings))],
        lambda: len(scheduler.waiting_requests))
    assert max_waiting >= 1, "some requests should have waited for cache blocks"
    for i, out in enumerate(outs):
        assert out[0]["finish"] == "length" and out[0]["ids"] == solo[i], (i, out[0]["ids"], solo[i])
    b.health()


# ----------------------------------------------------------------------------- load_format=dummy


@pytest.fixture(scope="module")
def tiny_dummy_dir(model_path, tmp_path_factory) -> pathlib.Path:
    """scripts/make_dummy_model.py's tiny Llama config (no weights), with the default model's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-dummy")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_dummy_model.py"), "--tokenizer-from",
                    model_path, "--out", str(out)], check=True)
    return out


def _dummy_backend(path, seed=7, **extra):
    cfg = EngineConfig(model=str(path), max_model_len=256, seed=seed, dtype="float32", device="cpu",
                       extra={"load_format": "dummy", "kv_cache_gib": 0.05, **extra})
    return hf_transformers.create(cfg)


def test_load_format_dummy(loop, tiny_dummy_dir, tmp_path):
    """Random weights for a config.json: the right shape, seeded, and they generate the tokens asked for."""
    import torch

    b = _dummy_backend(tiny_dummy_dir)
    loop.run_until_complete(b.start())
    try:
        cfg = b.model.config
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (128, 2, 49152)
        weight = b.model.get_input_embeddings().weight
        assert weight.std().item() > 1e-3, "weights should be random, not zeros"
        prompt = b.encode("Hello there")
        out = collect(loop, b, prompt, greedy(10, ignore_eos=True), "dummy")[0]
        assert out["finish"] == "length" and len(out["ids"]) == 10
        again = collect(loop, b, prompt, greedy(10, ignore_eos=True), "dummy-2")[0]
        assert again["ids"] == out["ids"]
        sampled = collect(loop, b, prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=1, logprobs=1,
                                                           presence_penalty=0.5), "dummy-3")[0]
        assert len(sampled["ids"]) <= 5
    finally:
        loop.run_until_complete(b.shutdown())

    # The same seed gives the same weights; another seed others.
    def embedding(seed):
        model = hf_transformers.load_model(str(tiny_dummy_dir), "dummy", torch.float32, "cpu", "sdpa", seed=seed)
        return model.get_input_embeddings().weight

    assert torch.equal(embedding(3), embedding(3)) and not torch.equal(embedding(3), embedding(4))

    # A directory with only config.json: a byte-level tokenizer stands in.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_dummy_dir / "config.json", bare / "config.json")
    b = _dummy_backend(bare)
    loop.run_until_complete(b.start())
    try:
        prompt = b.encode("héllo 🙂")
        assert prompt == list("héllo 🙂".encode())
        out = collect(loop, b, prompt, greedy(4, ignore_eos=True), "bare")[0]
        assert len(out["ids"]) == 4
        with pytest.raises(RequestError, match="chat template"):
            b.apply_chat_template(PARIS)
    finally:
        loop.run_until_complete(b.shutdown())

    with pytest.raises(ValueError, match="load_format 'gguf'"):
        loop.run_until_complete(_dummy_backend(tiny_dummy_dir, load_format="gguf").start())


# ----------------------------------------------------------------------------- the GPU benchmark script, on CPU


def test_bench_script_runs_on_cpu(tiny_dummy_dir, tmp_path):
    """scripts/bench_transformers_gpu.py end to end at tiny sizes (its numbers mean nothing here)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_transformers_gpu.py"), "--model", str(tiny_dummy_dir),
           "--device", "cpu", "--dtype", "float32", "--prompt-len", "8", "--batch1-tokens", "8", "--streams", "4",
           "--stream-tokens", "6", "--max-model-len", "128", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| govllm / generate_batch |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["load_format"] == "dummy"
    g = result["govllm"]
    assert g["batch1"]["tokens"] == 8 and g["batch1"]["decode_tokens_per_s"] > 0
    assert g["streams"]["complete"] and g["streams"]["tokens"] == 4 * 6
    assert result["generate_batch"]["complete"] and result["generate_batch"]["tokens"] == 4 * 6
    assert result["ratio"] > 0 and result["bound_tokens_per_s"] > 0
    # tied embeddings counted once: 49152 x 128 + 2 layers x (attention 2 x 128 x (128 + 64) + MLP 3 x 128 x 256
    # + 2 norms) + the final norm, float32
    params = 49152 * 128 + 2 * (2 * 128 * (128 + 64) + 3 * 128 * 256 + 2 * 128) + 128
    assert result["weight_bytes"] == 4 * params
