"""Anthropic's Messages API through the pinned anthropic SDK against a govllm server.

Run by anthropic_test.go (TestAnthropicSDK) with GOVLLM_URL, GOVLLM_MODEL, GOVLLM_BACKEND and
GOVLLM_API_KEY set. The SDK sends the key as x-api-key.
"""

from __future__ import annotations

import os
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

URL = os.environ["GOVLLM_URL"]
MODEL = os.environ["GOVLLM_MODEL"]
KEY = os.environ["GOVLLM_API_KEY"]

client = anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0, timeout=300)

HELLO = [{"role": "user", "content": "Name three colors."}]
# The pinned SDK has no temperature argument: it goes in the body as the API takes it.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def text_of(msg: anthropic.types.Message) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def test_create_greedy() -> None:
    msg = client.messages.create(model=MODEL, max_tokens=24, messages=HELLO, system="Be brief.", **GREEDY)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert text_of(msg).strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 24
    again = client.messages.create(model=MODEL, max_tokens=24, messages=HELLO, system="Be brief.", **GREEDY)
    assert text_of(again) == text_of(msg)


def test_stream_matches_create() -> None:
    want = client.messages.create(model=MODEL, max_tokens=32, messages=HELLO, **GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=32, messages=HELLO, **GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(want)
    assert text_of(final) == text_of(want)
    assert final.stop_reason == want.stop_reason
    assert final.usage.input_tokens == want.usage.input_tokens
    assert final.usage.output_tokens == want.usage.output_tokens


def test_prefill_is_continued() -> None:
    """A final assistant message is continued (the answer is the continuation), as the chat
    route's continue_final_message renders it."""
    prefill = [{"role": "user", "content": "Count from one to ten."}, {"role": "assistant", "content": "One, two, three,"}]
    msg = client.messages.create(model=MODEL, max_tokens=12, messages=prefill, **GREEDY)
    chat = httpx.post(f"{URL}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=300, json={
        "model": MODEL, "messages": prefill, "max_tokens": 12, "temperature": 0,
        "add_generation_prompt": False, "continue_final_message": True})
    assert chat.status_code == 200, chat.text
    assert text_of(msg) == chat.json()["choices"][0]["message"]["content"]
    assert text_of(msg).strip()


def test_max_tokens() -> None:
    msg = client.messages.create(model=MODEL, max_tokens=3, messages=HELLO, **GREEDY)
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3


def test_stop_sequences() -> None:
    free = text_of(client.messages.create(model=MODEL, max_tokens=32, messages=HELLO, **GREEDY))
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]  # a word the greedy answer reaches after some text
    cut = free[: free.index(stop)]
    msg = client.messages.create(model=MODEL, max_tokens=32, messages=HELLO, stop_sequences=[stop], **GREEDY)
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == stop
    assert text_of(msg) == cut
    with client.messages.stream(model=MODEL, max_tokens=32, messages=HELLO, stop_sequences=[stop], **GREEDY) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == cut
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def weather_request(**kw: Any) -> dict[str, Any]:
    return dict(model=MODEL, max_tokens=64, tools=[WEATHER],
                messages=[{"role": "user", "content": "What is the weather in Paris?"}], **GREEDY, **kw)


def test_forced_tool() -> None:
    msg = client.messages.create(**weather_request(tool_choice={"type": "tool", "name": "get_weather"}))
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1
    assert uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])

    with client.messages.stream(**weather_request(tool_choice={"type": "tool", "name": "get_weather"})) as s:
        final = s.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in streamed] == [(b.name, b.input) for b in uses]
    assert final.stop_reason == "tool_use"


def test_any_tool_and_result_round_trip() -> None:
    msg = client.messages.create(**weather_request(tool_choice={"type": "any", "disable_parallel_tool_use": True}))
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    follow = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": [{"type": "text", "text": "18 degrees and sunny"}]}]},
    ]
    answer = client.messages.create(model=MODEL, max_tokens=32, tools=[WEATHER], tool_choice={"type": "none"},
                                    messages=follow, **GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert text_of(answer).strip()
    # The tool result is part of the prompt.
    assert answer.usage.input_tokens > msg.usage.input_tokens


def test_count_tokens_equals_usage() -> None:
    req: dict[str, Any] = dict(model=MODEL, system="Be brief.", messages=HELLO)
    try:
        counted = client.messages.count_tokens(**req)
    except anthropic.APIStatusError as err:
        if err.status_code == 501:
            pytest.skip("the engine does not implement llm.Tokenizer yet (501)")
        raise
    msg = client.messages.create(max_tokens=2, **req, **GREEDY)
    assert counted.input_tokens == msg.usage.input_tokens
    with_tools = client.messages.count_tokens(**req, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens
    msg = client.messages.create(max_tokens=2, tools=[WEATHER], tool_choice={"type": "none"}, **req, **GREEDY)
    assert with_tools.input_tokens == msg.usage.input_tokens


@pytest.mark.parametrize("kw,field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
      "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, "messages[0].content[0].type"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty"),
    ({"stop_sequences": [""]}, "stop_sequences[0]"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
])
def test_bad_requests(kw: dict[str, Any], field: str) -> None:
    req: dict[str, Any] = dict(model=MODEL, max_tokens=8, messages=HELLO)
    req.update(kw)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(**req)
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert field in body["error"]["message"]
    # The server keeps serving.
    assert text_of(client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, **GREEDY)) is not None


def test_unknown_model() -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    assert err.value.body["error"]["type"] == "not_found_error"


def test_bad_key() -> None:
    bad = anthropic.Anthropic(base_url=URL, api_key="wrong-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model=MODEL, messages=HELLO)
    # x-api-key also opens the OpenAI routes.
    r = httpx.get(URL + "/v1/models", headers={"x-api-key": KEY})
    assert r.status_code == 200
