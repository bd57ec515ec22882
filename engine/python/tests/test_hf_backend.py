"""The transformers backend on the default model (SmolLM2-135M-Instruct), on CPU or CUDA.

One backend for the session (conftest.py's ``backend``); every test drives it on the session's
event loop through the bridge's token-id protocol (``submit``, ``stop_choice``, ``cancel``), with
a ``FakeRelay`` in place of ``_govllm_shim.relay``: what a test sees is what Go would receive.
Text and stop strings are Go's (engine/choice.go, the detok package) and tested there.
GOVLLM_TEST_MODEL, GOVLLM_TEST_DEVICE and GOVLLM_TEST_DTYPE override the model directory, the
device and the dtype (float32 by default).
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest

from govllm.backend import EngineConfig, EngineDeadError, RequestError, SamplingParams
from govllm.backends import hf_transformers
from govllm.backends.hf import backend as hf_backend
from govllm.backends.hf.sampler import LogprobRecord
from helpers import _collect, collect, decode_logprobs_meta, gather_watching, greedy
from hf_helpers import (
    CONCURRENCY, DEVICE, PARIS, engine_holds, fake_relay, records_of, start, tokens_of, topic_prompt, wait_released,
    wait_tokens,
)

STOP, LENGTH, ERROR = 1, 2, 4  # the shim's finish codes (cshim/shim.h)

# ----------------------------------------------------------------------------- basics


def test_health_and_surface(backend):
    backend.health()
    assert backend.name == "transformers"
    assert backend.max_model_len() > 100
    ids = backend.apply_chat_template(PARIS)
    assert ids and all(isinstance(t, int) for t in ids)
    assert backend.encode("Hello world") == backend.tokenizer("Hello world")["input_ids"]
    # Go detokenizes with the model's own tokenizer.json
    assert backend.tokenizer_dir() == backend.config.model
    assert os.path.isfile(os.path.join(backend.tokenizer_dir(), "tokenizer.json"))


def test_chat_capital_of_france(loop, backend):
    out = collect(loop, backend, backend.apply_chat_template(PARIS), greedy(20), "paris")[0]
    assert "Paris" in out["text"], out
    assert out["finish"] in ("stop", "length")
    assert out["deltas"] >= 2, "expected streaming deltas"
    if out["finish"] == "stop":  # the EOS token is relayed (Go leaves its text out)
        assert out["ids"][-1] in backend.eos_token_ids


def test_relay_protocol(loop, backend):
    """Each output is routed by engine id to go_id << 16 | index, has only the step's new tokens,
    and exactly the last one of a choice has a finish code; without logprobs there is no meta."""
    go_id, done = loop.run_until_complete(start(backend, topic_prompt(backend, 6), greedy(5, ignore_eos=True),
                                                 "protocol"))
    assert not done.done()
    loop.run_until_complete(asyncio.wait_for(done, 60))
    assert done.result() is None
    records = records_of(backend, go_id)
    assert len(records) >= 2 and all(r["index"] == 0 and r["meta"] is None for r in records)
    assert [r["finish"] for r in records] == [0] * (len(records) - 1) + [LENGTH]
    assert sum(len(r["ids"]) for r in records) == 5 and all(r["ids"] for r in records)
    assert backend._table.routes == {} and backend._table.requests == {}

    async def twice():
        go_id, first = await start(backend, [1, 2, 3], greedy(2), "dup")
        try:
            with pytest.raises(RequestError, match="already running"):
                await backend.submit([1, 2, 3], greedy(2), "dup-2", go_id)
        finally:
            await first

    loop.run_until_complete(twice())


def test_one_relay_call_per_step(loop, backend):
    """The outputs of one engine step reach the relay in one call, not one call each."""
    relay = fake_relay(backend)
    prompts = [topic_prompt(backend, 60 + i) for i in range(8)]
    calls, count = relay.calls, len(relay.records)
    loop.run_until_complete(asyncio.gather(*[_collect(backend, p, greedy(8, ignore_eos=True), f"step-{i}")
                                             for i, p in enumerate(prompts)]))
    calls, count = relay.calls - calls, len(relay.records) - count
    assert count >= 8 * 2
    assert calls <= count / 3, f"{calls} relay calls for {count} outputs"


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


def test_stop_strings_are_not_the_backends(loop, backend):
    """Go matches stop strings: the backend generates on as if there were none."""
    prompt = backend.apply_chat_template(PARIS)
    full = collect(loop, backend, prompt, greedy(12), "nostop-full")[0]
    first_word = full["text"].split()[0]
    out = collect(loop, backend, prompt, greedy(12, stop=[first_word]), "nostop")[0]
    assert out["ids"] == full["ids"] and out["finish"] == full["finish"]


def test_stop_choice(loop, backend):
    """Go matched a stop string: stop_choice cancels that choice in the manager and stops routing
    it; the request's future resolves once its other choices end too."""
    prompt = topic_prompt(backend, 8)

    async def scenario():
        go_id, done = await start(backend, prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=2,
                                                                  ignore_eos=True), "stop-me")
        await wait_tokens(backend, go_id, 3, index=0)
        backend.stop_choice(go_id, 0)
        stopped_at = len(records_of(backend, go_id, 0))
        backend.stop_choice(go_id, 0)  # twice, or after the choice ended: nothing happens
        backend.stop_choice(go_id, 7)
        assert not done.done(), "choice 1 is still running"
        await asyncio.wait_for(done, 60)
        await asyncio.sleep(3 * hf_transformers.WATCHDOG_INTERVAL_S)  # late outputs of choice 0 are dropped
        return go_id, stopped_at

    go_id, stopped_at = loop.run_until_complete(scenario())
    assert len(records_of(backend, go_id, 0)) == stopped_at
    assert all(r["finish"] == 0 for r in records_of(backend, go_id, 0))
    assert len(tokens_of(backend, go_id, 0)) < 30
    assert len(tokens_of(backend, go_id, 1)) == 30 and records_of(backend, go_id, 1)[-1]["finish"] == LENGTH
    assert loop.run_until_complete(wait_released(backend, "stop-me"))
    assert backend._table.routes == {} and backend._table.requests == {}


def test_stop_token_ids(loop, backend):
    prompt = backend.apply_chat_template(PARIS)
    full = collect(loop, backend, prompt, greedy(10), "stoptok-full")[0]
    target = full["ids"][2]
    if target in full["ids"][:2]:
        target = full["ids"][3]
    out = collect(loop, backend, prompt, greedy(10, stop_token_ids=[target]), "stoptok")[0]
    assert out["finish"] == "stop"
    assert out["ids"] == full["ids"][: full["ids"].index(target) + 1]  # the stop token is relayed, finish STOP


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


def test_cancel_mid_stream(loop, backend):
    """cancel (the client went away): the future resolves at once, nothing more is relayed, the
    manager lets go of every choice, and the engine still serves."""
    async def scenario():
        go_id, done = await start(backend, topic_prompt(backend, 2), greedy(200, ignore_eos=True, n=2), "cancel-me")
        await wait_tokens(backend, go_id, 3)
        assert engine_holds(backend, "cancel-me")
        assert backend.num_running() >= 2
        backend.cancel(go_id)
        assert done.done() and done.result() is None
        cancelled_at = len(records_of(backend, go_id))
        released = await wait_released(backend, "cancel-me")
        # outputs of the step that ran while the cancel was in flight do not pile up in the manager
        await asyncio.sleep(3 * hf_transformers.WATCHDOG_INTERVAL_S)
        return go_id, cancelled_at, released

    go_id, cancelled_at, released = loop.run_until_complete(scenario())
    assert released, "manager still holds the cancelled request"
    assert len(records_of(backend, go_id)) == cancelled_at
    assert sum(len(r["ids"]) for r in records_of(backend, go_id)) < 400
    assert all(r["finish"] == 0 for r in records_of(backend, go_id))
    assert backend.manager.output_router.output_queue.empty()
    assert backend._table.routes == {} and backend._table.requests == {} and backend.num_running() == 0
    backend.cancel(go_id)  # a request that ended: nothing happens
    assert collect(loop, backend, topic_prompt(backend, 4), greedy(2), "after-cancel")[0]["finish"] == "length"


def test_failed_choice_is_an_error_finish(loop, backend):
    """A request the manager fails (the engine still up) ends its choice with finish ERROR (a 500
    in Go); its other choices are cancelled."""
    async def scenario():
        go_id, done = await start(backend, topic_prompt(backend, 3), greedy(200, ignore_eos=True, n=2), "fail-me")
        await wait_tokens(backend, go_id, 2)
        choice = backend._table.requests[go_id].extra[0]
        failed = SimpleNamespace(request_id=choice.engine_id, generated_tokens=[], error="simulated",
                                 status=None, is_finished=lambda: True)
        backend._on_output(choice, failed)
        await asyncio.wait_for(done, 10)
        return go_id

    go_id = loop.run_until_complete(scenario())
    assert records_of(backend, go_id, 0)[-1] == {"go_id": go_id, "index": 0, "ids": [], "finish": ERROR, "meta": None}
    assert all(r["finish"] == 0 for r in records_of(backend, go_id, 1))
    assert loop.run_until_complete(wait_released(backend, "fail-me"))
    backend.health()


def test_relay_failure_fails_the_request(loop, backend, monkeypatch):
    def broken(outputs, routes, finish_codes, logprobs_meta):
        raise ValueError("simulated relay failure")

    monkeypatch.setattr(backend, "relay", broken)

    async def scenario():
        done = await backend.submit(topic_prompt(backend, 3), greedy(50, ignore_eos=True), "relay-fail", 1 << 40)
        with pytest.raises(ValueError, match="simulated relay failure"):
            await asyncio.wait_for(done, 60)

    loop.run_until_complete(scenario())
    assert loop.run_until_complete(wait_released(backend, "relay-fail"))
    assert backend._table.routes == {} and backend._table.requests == {}


def test_logprobs_meta_layout():
    """logprobs_meta gives the bytes vllm_compat.logprobs_meta gives for the same rows."""
    import numpy as np

    from govllm.backends import vllm_compat

    records = [LogprobRecord(4, 7, -0.5, (7, 3), (-0.5, -1.25), 1), None,
               LogprobRecord(6, 3, -2.0, (9, 7), (-0.25, -1.5), 3)]
    out = hf_backend._Output("r", [7, 8, 3], None, records, top=2)
    meta = hf_backend.logprobs_meta(out)
    nan = float("nan")
    lists = SimpleNamespace(logprob_token_ids=np.array([[7, 7, 3], [8, 8, 8], [3, 9, 7]]),
                            logprobs=np.array([[-0.5, -0.5, -1.25], [nan, nan, nan], [-2.0, -0.25, -1.5]]),
                            sampled_token_ranks=np.array([1, 0, 3]))
    assert meta == vllm_compat.logprobs_meta(SimpleNamespace(new_logprobs=lists))
    rows = decode_logprobs_meta(meta)
    assert [r["ids"] for r in rows] == [[7, 7, 3], [8, 8, 8], [3, 9, 7]]
    assert [r["rank"] for r in rows] == [1, 0, 3]
    # no alternatives asked for: one column
    single = hf_backend.logprobs_meta(hf_backend._Output("r", [7], None, records[:1], top=0))
    assert decode_logprobs_meta(single) == [{"ids": [7], "logprobs": [-0.5], "rank": 1}]


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
        early = [await start(backend, topic_prompt(backend, 41 + i), greedy(40, ignore_eos=True), f"early-{i}")
                 for i in range(4)]
        for go_id, _ in early:
            await wait_tokens(backend, go_id, 6)
        running = sum(1 for _, done in early if not done.done())
        late = await _collect(backend, late_prompt, greedy(16, ignore_eos=True), "late")
        await asyncio.gather(*[done for _, done in early])
        return running, late[0]["ids"]

    running, late = loop.run_until_complete(scenario())
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
