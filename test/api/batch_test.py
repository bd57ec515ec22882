"""Batched prompts on /v1/completions, stop_reason, include_stop_str_in_output and
continuous_usage_stats against a real govllm server (run by batch_test.go with GOVLLM_URL,
GOVLLM_MODEL, GOVLLM_API_KEY, GOVLLM_BACKEND)."""

from __future__ import annotations

import os

import openai
import pytest

PROMPTS = ["The capital of France is", "Once upon a time, there was", "1, 2, 3, 4,"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=os.environ["GOVLLM_URL"] + "/v1", api_key=os.environ["GOVLLM_API_KEY"],
                         max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model() -> str:
    return os.environ["GOVLLM_MODEL"]


def greedy(client: openai.OpenAI, model: str, prompt, **kw):
    """A greedy completion. vLLM refuses n > 1 at temperature 0: top_k 1 is greedy too."""
    if kw.get("n", 1) > 1:
        kw["extra_body"] = {**kw.get("extra_body", {}), "top_k": 1}
        temperature = 1.0
    else:
        temperature = 0.0
    return client.completions.create(model=model, prompt=prompt, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                                     temperature=temperature, **kw)


@pytest.fixture(scope="module")
def solo(client, model):
    """Each prompt alone: its greedy text, usage and prompt token ids."""
    out = []
    for p in PROMPTS:
        r = greedy(client, model, p, extra_body={"return_token_ids": True})
        c = r.choices[0]
        out.append({"text": c.text, "usage": r.usage, "prompt_ids": c.model_extra["prompt_token_ids"],
                    "ids": c.model_extra["token_ids"]})
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_batched_equals_solo(client, model, solo, n):
    r = greedy(client, model, PROMPTS, n=n)
    assert [c.index for c in r.choices] == list(range(len(PROMPTS) * n))
    for c in r.choices:
        assert c.text == solo[c.index // n]["text"], c.index
    assert r.usage.prompt_tokens == sum(s["usage"].prompt_tokens for s in solo)
    assert r.usage.completion_tokens == n * sum(s["usage"].completion_tokens for s in solo)


@pytest.mark.parametrize("n", [1, 2])
def test_batched_stream_equals_solo(client, model, solo, n):
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in greedy(client, model, PROMPTS, n=n, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finishes, "one finish per choice"
                finishes[c.index] = c.finish_reason
    assert sorted(texts) == list(range(len(PROMPTS) * n))
    assert sorted(finishes) == list(range(len(PROMPTS) * n))
    for i, text in texts.items():
        assert text == solo[i // n]["text"], i
    assert usage is not None
    assert usage.completion_tokens == n * sum(s["usage"].completion_tokens for s in solo)


def test_batched_token_ids(client, model, solo):
    r = greedy(client, model, [s["prompt_ids"] for s in solo], extra_body={"return_token_ids": True})
    for c in r.choices:
        assert c.text == solo[c.index]["text"]
        assert c.model_extra["prompt_token_ids"] == solo[c.index]["prompt_ids"], "each choice its own prompt's ids"


def test_batched_echo(client, model, solo):
    r = greedy(client, model, PROMPTS[:2], echo=True)
    for c in r.choices:
        assert c.text == PROMPTS[c.index] + solo[c.index]["text"]


@pytest.mark.parametrize("prompt", [[], ["a", ""], ["a", [1, 2]], [[1], [2.5]]])
def test_batched_bad_lists(client, model, prompt):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model, prompt)
    assert e.value.body["param"] == "prompt"


def stop_word(text: str) -> str:
    """A word of text from its second one on (so that the stop string ends some output)."""
    words = text.split()
    assert len(words) >= 2, text
    return words[1]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_reason(client, model, solo, include):
    text = solo[0]["text"]
    word = stop_word(text)
    at = text.index(word)
    r = greedy(client, model, PROMPTS[0], stop=[word], extra_body={"include_stop_str_in_output": include})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == word
    assert c.text == (text[:at + len(word)] if include else text[:at])


def test_stop_string_reason_chat(client, model):
    msgs = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    word = stop_word(full.choices[0].message.content)
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == word
    last = None
    for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                stop=[word], stream=True):
        for c in chunk.choices:
            if c.finish_reason is not None:
                last = c
    assert last is not None and last.model_extra["stop_reason"] == word


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_reason(client, model, solo, include):
    ids = solo[1]["ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    stop_id = ids[k]
    r = greedy(client, model, PROMPTS[1], extra_body={"stop_token_ids": [stop_id], "include_stop_str_in_output": include})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == stop_id
    assert r.usage.completion_tokens == k + 1, "the stop token is counted"
    # The text is the greedy text of the tokens before it, or with it when included.
    want = greedy(client, model, PROMPTS[1], max_tokens=k + 1 if include else k).choices[0].text
    assert c.text == want
    streamed = [ch for chunk in greedy(client, model, PROMPTS[1], stream=True, extra_body={"stop_token_ids": [stop_id]})
                for ch in chunk.choices]
    assert streamed[-1].finish_reason == "stop" and streamed[-1].model_extra["stop_reason"] == stop_id


def test_length_has_no_stop_reason(client, model):
    c = greedy(client, model, PROMPTS[0], max_tokens=2).choices[0]
    assert c.finish_reason == "length"
    assert c.model_extra["stop_reason"] is None


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage(client, model, route):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if route == "chat":
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options=opts)
    else:
        stream = greedy(client, model, PROMPTS[0], stream=True, stream_options=opts)
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    counts = []
    for chunk in chunks[:-1]:
        assert chunk.usage is not None, chunk
        assert chunk.usage.prompt_tokens == final.usage.prompt_tokens
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        counts.append(chunk.usage.completion_tokens)
    assert counts == sorted(counts), "counts only grow"
    assert counts[-1] == final.usage.completion_tokens
    # Without include_usage it is ignored, as in vLLM.
    for chunk in greedy(client, model, PROMPTS[0], stream=True, stream_options={"continuous_usage_stats": True}):
        assert chunk.usage is None
