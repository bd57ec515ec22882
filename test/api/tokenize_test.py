"""/tokenize, /detokenize and /version against a govllm server (GOVLLM_URL, GOVLLM_MODEL,
GOVLLM_BACKEND, GOVLLM_API_KEY; run by tokenize_test.go on each backend)."""

from __future__ import annotations

import os

import httpx
import pytest
from openai import OpenAI

URL = os.environ["GOVLLM_URL"]
MODEL = os.environ["GOVLLM_MODEL"]
BACKEND = os.environ["GOVLLM_BACKEND"]
KEY = os.environ["GOVLLM_API_KEY"]
TEXT = "héllo wörld 你好 🎉"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? 你好 🎉"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def http():
    with httpx.Client(base_url=URL, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client():
    return OpenAI(base_url=URL + "/v1", api_key=KEY, timeout=300)


def tokenize(http, **body):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_utf8_round_trip(http):
    got = tokenize(http, model=MODEL, prompt=TEXT, return_token_strs=True)
    assert set(got) == {"count", "max_model_len", "tokens", "token_strs"}
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) > 5
    assert got["max_model_len"] == 2048
    r = http.post("/detokenize", json={"model": MODEL, "tokens": got["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": TEXT}
    # one token at a time the pieces are not text (split characters), together they are
    assert "".join(got["token_strs"]) != TEXT


def test_token_strs_default_null(http):
    assert tokenize(http, prompt="hi")["token_strs"] is None


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
def test_messages_count_is_chat_prompt_tokens(http, client, tools):
    body = {"messages": MESSAGES}
    kwargs = {}
    if tools:
        body["tools"] = kwargs["tools"] = tools
    got = tokenize(http, **body)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0, **kwargs)
    assert chat.usage.prompt_tokens == got["count"]
    text = http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "Wie geht's? 你好 🎉" in text
    if tools:
        assert "get_weather" in text


def test_generation_prompt_and_continuation(http):
    with_prompt = tokenize(http, messages=MESSAGES)["tokens"]
    without = tokenize(http, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert len(without) < len(with_prompt) and with_prompt[:len(without)] == without
    cont = tokenize(http, messages=MESSAGES + [{"role": "assistant", "content": "Es geht"}],
                    continue_final_message=True)["tokens"]
    text = http.post("/detokenize", json={"tokens": cont}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nEs geht")


def test_completion_prompt_matches_completions_usage(http, client):
    got = tokenize(http, prompt=TEXT)
    done = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == got["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "messages"),
    ("/tokenize", {"prompt": ""}, 400, "prompt"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"tokens": []}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_errors(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status and err["message"], err


def test_version(http):
    r = httpx.get(URL + "/version")  # no API key needed, as in vLLM
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["version"] and v["backend"] == BACKEND and v["backend_version"], v
