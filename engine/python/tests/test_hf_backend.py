"""The transformers backend on the default model (SmolLM2-135M-Instruct), on CPU or CUDA.

One backend for the session (conftest.py's ``backend``); every test drives it on the session's
event loop. GOVLLM_TEST_MODEL, GOVLLM_TEST_DEVICE and GOVLLM_TEST_DTYPE override the model
directory, the device and the dtype (float32 by default).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from govllm.backend import EngineConfig, EngineDeadError, RequestError, SamplingParams
from govllm.backends import hf_transformers
from helpers import _collect, collect, gather_watching, greedy
from hf_helpers import CONCURRENCY, DEVICE, PARIS, engine_holds, topic_prompt, wait_released

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
    assert loop.run_until_complete(wait_released(backend, "stop-str"))


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
    assert loop.run_until_complete(wait_released(backend, "abort-me")), "manager still holds the aborted request"
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
        assert engine_holds(backend, "cancel-me")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await wait_released(backend, "cancel-me")

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
                       device=DEVICE, extra={"kv_cache_gib": 0.05})
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
                       device=DEVICE, extra={"num_blocks": 1, "page_size": 16})
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
