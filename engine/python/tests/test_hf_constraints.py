"""Per-request constraints of the transformers backend, end to end: structured outputs (xgrammar),
logit_bias, allowed_token_ids and bad_words, each row of a batch under its own constraint.

Most tests run on models/tiny-llama-dummy (random weights: at temperature 1 its distribution is
close to uniform, so only the constraint can make an output valid), each with a control showing the
same request without the constraint fails the check."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re

import jsonschema
import pytest

from govllm.backend import EngineConfig, RequestError, SamplingParams
from govllm.backends import hf_transformers
from govllm.backends.hf.sampler import RequestSampling, build_sampler_class
from helpers import _collect, collect, greedy
from hf_helpers import fake_request

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
RANDOM_MODEL = REPO_ROOT / "models" / "tiny-llama-dummy"

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
            "required": ["ok", "tag"],
        },
    },
    "required": ["color", "count", "inner"],
}
REGEX = r"[a-c]{2}-[0-9]{3}"
CHOICES = ["alpha", "beta gamma", 'say "hi"']
EBNF = 'root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] "+" expr'
LARK = 'start: "yes" | "no" | "maybe"'


def _schema_ok(text):
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


# name: (structured_outputs, check of the output text)
CONSTRAINTS = {
    "json": ({"json": SCHEMA, "disable_any_whitespace": True}, _schema_ok),
    "regex": ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) is not None),
    "choice": ({"choice": CHOICES}, lambda t: t in CHOICES),
    "ebnf": ({"grammar": EBNF}, lambda t: re.fullmatch(r"\([0-9](\+[0-9])*\)", t) is not None),
    "lark": ({"grammar": LARK}, lambda t: t in ("yes", "no", "maybe")),
}


@pytest.fixture(scope="module")
def rnd(loop):
    """The random-weights backend (load_format=dummy)."""
    cfg = EngineConfig(model=str(RANDOM_MODEL), max_model_len=512, max_num_seqs=16, seed=7, dtype="float32",
                       device="cpu", extra={"load_format": "dummy", "kv_cache_gib": 0.05})
    b = hf_transformers.create(cfg)
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.shutdown())


def sampled(max_tokens, seed, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, **kw)


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_constraint_holds_sampled_and_greedy(loop, rnd, name):
    """Temperature 1 (several seeds) and greedy: every output satisfies the constraint and ends with
    "stop" (the grammar completed, EOS forced); without the constraint the same requests do not."""
    spec, ok = CONSTRAINTS[name]
    prompt = rnd.encode("Answer:")
    params = [sampled(80, seed, structured_outputs=spec) for seed in (1, 2, 3)] + [greedy(80, structured_outputs=spec)]

    async def together():
        return await asyncio.gather(*[_collect(rnd, prompt, sp, f"c-{name}-{i}") for i, sp in enumerate(params)])

    outs = [o[0] for o in loop.run_until_complete(together())]
    for sp, out in zip(params, outs):
        assert out["finish"] == "stop" and out["ids"][-1] in rnd.eos_token_ids, (sp.seed, out)
        assert ok(out["text"]), (name, sp.seed, out["text"])
    free = [collect(loop, rnd, prompt, sampled(20, seed), f"free-{name}-{seed}")[0] for seed in (1, 2)]
    assert not any(ok(o["text"]) for o in free), [o["text"] for o in free]


def test_json_object(loop, rnd, backend):
    """json_object: the real model's greedy answer parses to a dict; the random model at temperature 1
    writes what xgrammar's JSON-object grammar accepts as a prefix (its strings rarely end), unlike
    without the constraint."""
    # A question the model answers in prose when free (it ignores the request for JSON).
    prompt = backend.apply_chat_template(
        [{"role": "user", "content": 'What is the capital of France? Answer in JSON with the key "city".'}])
    out = collect(loop, backend, prompt, greedy(120, structured_outputs={"json_object": True}), "jo-real")[0]
    assert out["finish"] == "stop", out
    assert isinstance(json.loads(out["text"]), dict), out["text"]
    free = collect(loop, backend, prompt, greedy(40), "jo-real-free")[0]
    assert not free["text"].lstrip().startswith("{"), free["text"]

    checker = rnd.structured_compiler()
    constraint = loop.run_until_complete(checker.compile_constraint({"json_object": True}))
    rprompt = rnd.encode("JSON:")
    for seed in (1, 2):
        o = collect(loop, rnd, rprompt, sampled(30, seed, structured_outputs={"json_object": True}), f"jo-{seed}")[0]
        assert o["text"].startswith("{") and checker.matcher(constraint).accept_string(o["text"]), o["text"]
        f = collect(loop, rnd, rprompt, sampled(30, seed), f"jo-free-{seed}")[0]
        assert not checker.matcher(constraint).accept_string(f["text"]), f["text"]


def test_mixed_batch_constrains_only_its_row(loop, rnd):
    """A constrained and a free request decode together: the constrained one is valid, the free one
    gives exactly what it gives alone (greedy)."""
    prompt = rnd.encode("Hello there")
    alone = collect(loop, rnd, prompt, greedy(24, ignore_eos=True), "mix-alone")[0]

    async def together():
        return await asyncio.gather(
            _collect(rnd, prompt, greedy(60, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}),
                     "mix-json"),
            _collect(rnd, prompt, greedy(24, ignore_eos=True), "mix-free"),
            _collect(rnd, prompt, sampled(60, 5, structured_outputs={"regex": REGEX}), "mix-regex"),
        )

    js, free, rx = [o[0] for o in loop.run_until_complete(together())]
    assert _schema_ok(js["text"]), js
    assert re.fullmatch(REGEX, rx["text"]), rx
    assert free["ids"] == alone["ids"]
    assert not _schema_ok(free["text"])


def test_n_choices_each_valid(loop, rnd):
    prompt = rnd.encode("Pick:")
    outs = collect(loop, rnd, prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=9, n=4,
                                                    structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}),
                   "n4")
    assert sorted(outs) == [0, 1, 2, 3]
    texts = [outs[i]["text"] for i in range(4)]
    assert all(_schema_ok(t) for t in texts), texts
    assert len(set(texts)) > 1, "the choices should differ (each has its own matcher and key)"


def test_constrained_logprobs_are_of_the_masked_distribution(loop, rnd):
    """vLLM's default raw_logprobs see the grammar bitmask (applied before its sampler): every
    alternative reported with a finite logprob is a token the grammar allowed, and the forced EOS
    has logprob 0."""
    prompt = rnd.encode("Choose:")
    out = collect(loop, rnd, prompt, greedy(20, logprobs=5, structured_outputs={"choice": ["yes", "no"]}), "lp")[0]
    assert out["text"] in ("yes", "no") and len(out["logprobs"]) == len(out["ids"])
    first = out["logprobs"][0]
    finite = [t for t, lp in zip(first["ids"][1:], first["logprobs"][1:]) if lp > float("-inf")]
    assert finite and all("yes".startswith(rnd.decode([t])) or "no".startswith(rnd.decode([t])) for t in finite), \
        [rnd.decode([t]) for t in finite]
    assert out["logprobs"][-1]["ids"][0] in rnd.eos_token_ids and out["logprobs"][-1]["logprobs"][0] == 0.0
    free = collect(loop, rnd, prompt, greedy(3, logprobs=5), "lp-free")[0]
    assert all(lp > float("-inf") for lp in free["logprobs"][0]["logprobs"])


def test_logit_bias(loop, rnd):
    prompt = rnd.encode("Hello there")
    base = collect(loop, rnd, prompt, greedy(8, ignore_eos=True), "lb-base")[0]["ids"]
    token = 1234 if 1234 not in base else 4321
    up = collect(loop, rnd, prompt, greedy(8, ignore_eos=True, logit_bias={token: 100}), "lb-up")[0]["ids"]
    assert up == [token] * 8
    down = collect(loop, rnd, prompt, greedy(8, ignore_eos=True, logit_bias={str(base[0]): -100}), "lb-down")[0]["ids"]
    assert down[0] != base[0] and base[0] not in down


def test_allowed_token_ids(loop, rnd):
    prompt = rnd.encode("Hello there")
    allowed = [300, 301, 302, 5000]
    for seed in (1, 2):
        out = collect(loop, rnd, prompt, sampled(16, seed, ignore_eos=True, allowed_token_ids=allowed), f"al-{seed}")[0]
        assert len(out["ids"]) == 16 and set(out["ids"]) <= set(allowed), out["ids"]
    free = collect(loop, rnd, prompt, sampled(16, 1, ignore_eos=True), "al-free")[0]
    assert not set(free["ids"]) <= set(allowed)


def test_bad_words(loop, rnd):
    """vLLM's rule: a word's last token is banned right after its other tokens (with and without a
    leading space); a one-token word is always banned."""
    prompt = rnd.encode("Hello there")
    base = collect(loop, rnd, prompt, greedy(24, ignore_eos=True), "bw-base")[0]["ids"]

    def contains(ids, seq):
        return any(ids[i:i + len(seq)] == list(seq) for i in range(len(ids) - len(seq) + 1))

    # A word of several tokens that the greedy output contains, and a one-token word it contains.
    multi = single = None
    for i in range(len(base) - 1):
        word = rnd.decode(base[i:i + 2])
        seqs = rnd.bad_words_token_ids([word])
        if multi is None and any(len(s) > 1 and contains(base, s) for s in seqs):
            multi = word
        if single is None and len(rnd.bad_words_token_ids([rnd.decode([base[i]])])[0]) == 1:
            single = rnd.decode([base[i]])
    assert multi and single, base
    for word in (multi, single):
        seqs = rnd.bad_words_token_ids([word])
        assert any(contains(base, s) for s in seqs), (word, seqs)
        out = collect(loop, rnd, prompt, greedy(24, ignore_eos=True, bad_words=[word]), "bw")[0]["ids"]
        assert not any(contains(out, s) for s in seqs), (word, seqs, out)
        assert len(out) == 24


@pytest.mark.parametrize("kw, param", [
    ({"logit_bias": {49152: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"allowed_token_ids": [1, 49152]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"structured_outputs": {"regex": "a(b", "param": "response_format"}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "foo"}, "param": "tool_choice"}}, "tool_choice"),
    ({"structured_outputs": {"grammar": "root ::= (", "param": "structured_outputs"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s(loop, rnd, kw, param):
    with pytest.raises(RequestError) as info:
        collect(loop, rnd, rnd.encode("x"), greedy(4, **kw), "bad")
    assert info.value.param == param
    assert rnd.num_running() == 0


def test_compile_timeout_is_a_400(loop, rnd):
    rnd.structured_compiler()
    loop.run_until_complete(rnd.structured_compiler().ready())
    props = {f"f{i}": {"type": "string", "pattern": "[a-z]{3,9}[0-9]{2,6}"} for i in range(200)}
    saved, rnd._structured_timeout = rnd._structured_timeout, 0.001
    try:
        with pytest.raises(RequestError, match=r"did not compile within 0.001 s \(--structured-output-timeout\)") as info:
            collect(loop, rnd, rnd.encode("x"), greedy(4, structured_outputs={"json": {"type": "object", "properties": props},
                                                                           "param": "response_format"}), "slow")
        assert info.value.param == "response_format"
    finally:
        rnd._structured_timeout = saved


def test_free_batches_build_no_plan():
    """Only constrained rows pay: a batch of plain requests builds no plan (the fast path); a
    constrained row makes one."""
    import torch

    sampler = build_sampler_class()()
    storage = torch.zeros(sampler.ROWS, 4, dtype=torch.int32)
    free = [fake_request(f"r{i}", RequestSampling(temperature=0.7, top_p=0.9, key=i), [1, 2, 3], [4]) for i in range(3)]
    sampler.prepare_tensor_args(free, storage)
    assert sampler._plan is None
    for kw in ({"logit_bias": {5: 1.0}}, {"allowed": (1, 2)}, {"bad_words": ((7,),)}, {"matcher": object()}):
        sampler.prepare_tensor_args(free + [fake_request("c", RequestSampling(**kw), [1, 2, 3], [4])], storage)
        assert sampler._plan is not None, kw
