"""Penalties, min_tokens, min_p and logprobs of the transformers backend, end to end, against an
independent reference (the same checkpoint run outside the manager)."""

from __future__ import annotations

import asyncio

from govllm.backend import SamplingParams
from helpers import collect, decode_logprobs_meta, greedy
from hf_helpers import PARIS, records_of, reference_greedy, reference_logits, run_together, start, topic_prompt

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
    eos_out, stop_out = run_together(loop, backend, [
        (prompt, greedy(n + 8, min_tokens=n + 4), "mint-eos"),
        (prompt, greedy(8, min_tokens=4, stop_token_ids=[stop_token]), "mint-stop"),
    ])
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
    penalties), the top alternatives are sorted and start with the greedy token, ranks are the
    sampled token's, and every relayed output has one meta row per token, in the vLLM backend's
    layout (column 0 the sampled token, then logprobs alternatives)."""
    import torch

    prompt = backend.apply_chat_template(PARIS)
    sampled = SamplingParams(max_tokens=6, temperature=0.7, seed=11, logprobs=2, repetition_penalty=1.2,
                             ignore_eos=True)

    async def run(sampling, request_id):
        go_id, done = await start(backend, prompt, sampling, request_id)
        await done
        ids, rows = [], []
        for r in records_of(backend, go_id):
            assert r["meta"] is not None or not r["ids"], r
            got = decode_logprobs_meta(r["meta"]) if r["meta"] is not None else []
            assert len(got) == len(r["ids"])
            ids += r["ids"]
            rows += got
        return ids, rows

    async def together():
        return await asyncio.gather(run(greedy(6, logprobs=5, ignore_eos=True), "lp-greedy"),
                                    run(sampled, "lp-sampled"), run(greedy(3, logprobs=0), "lp-zero"))

    (ids, rows), (sampled_ids, sampled_rows), (zero_ids, zero_rows) = loop.run_until_complete(together())
    assert ids == collect(loop, backend, prompt, greedy(6, ignore_eos=True), "lp-plain")[0]["ids"]
    ref = torch.log_softmax(reference_logits(ref_model, prompt + ids)[len(prompt) - 1:-1], -1)
    for i, (token, row) in enumerate(zip(ids, rows)):
        assert len(row["ids"]) == 6 and row["ids"][0] == token
        assert abs(row["logprobs"][0] - ref[i, token].item()) < 1e-3, (i, row, ref[i, token])
        assert row["rank"] == 1  # greedy: the most likely token
        top, top_ids = row["logprobs"][1:], row["ids"][1:]
        assert top == sorted(top, reverse=True)
        assert top_ids[0] == token and abs(top[0] - row["logprobs"][0]) < 1e-6
        values, order = ref[i].topk(5)
        assert top_ids == order.tolist()
        assert all(abs(t - r.item()) < 1e-3 for t, r in zip(top, values))
    assert len(zero_rows) == len(zero_ids) == 3 and all(len(r["ids"]) == 1 for r in zero_rows)
    assert [r["ids"][0] for r in zero_rows] == zero_ids

    # sampled at temperature 0.7 with a penalty: still the raw logprobs of the sampled tokens
    ref = torch.log_softmax(reference_logits(ref_model, prompt + sampled_ids)[len(prompt) - 1:-1], -1)
    assert sampled_ids != ids
    for i, (token, row) in enumerate(zip(sampled_ids, sampled_rows)):
        assert abs(row["logprobs"][0] - ref[i, token].item()) < 1e-3, (i, row, ref[i, token])
        assert len(row["ids"]) == 3 and row["ids"][0] == token
        lp = ref[i, token].item()  # the rank counts the tokens at least as likely (the reference's within 1e-3)
        assert int((ref[i] > lp + 1e-3).sum()) + 1 <= row["rank"] <= int((ref[i] >= lp - 1e-3).sum()), (i, row)
