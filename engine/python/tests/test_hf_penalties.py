"""Penalties, min_tokens, min_p and logprobs of the transformers backend, end to end, against an
independent reference (the same checkpoint run outside the manager)."""

from __future__ import annotations

import asyncio

from govllm.backend import SamplingParams
from helpers import collect, greedy
from hf_helpers import PARIS, reference_greedy, reference_logits, run_together, topic_prompt

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
    outs = {name: o["ids"] for name, o in zip(list(cases) + ["again"], run_together(loop, backend, jobs))}
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
    outs = run_together(loop, backend, [
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
    outs = run_together(loop, backend, [
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
