"""/v1/responses through the official openai Python SDK, against a running govllm.

Run by responses_test.go's TestResponsesSDK with GOVLLM_URL, GOVLLM_MODEL, GOVLLM_BACKEND and
GOVLLM_API_KEY; the server serves the default model with hermes auto tool choice. Greedy
decoding throughout: streamed and whole answers must agree token for token, and constraints (not
the model) make structured outputs and forced calls valid.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

URL = os.environ.get("GOVLLM_URL", "http://127.0.0.1:8000")
MODEL = os.environ.get("GOVLLM_MODEL", "SmolLM2-135M-Instruct")
client = openai.OpenAI(base_url=URL + "/v1", api_key=os.environ.get("GOVLLM_API_KEY", "unused"),
                       max_retries=0, timeout=300)

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": WEATHER_PARAMS, "strict": True}]
ASK = "What is the capital of France?"


class City(BaseModel):
    """A bounded string and an enum, so that greedy output always ends."""

    name: str = Field(max_length=16)
    country: Literal["France", "Spain", "Italy"]


def greedy(**kw):
    return dict(model=MODEL, temperature=0, max_output_tokens=24, **kw)


def test_create() -> None:
    r = client.responses.create(**greedy(input=ASK, instructions="You are a helpful assistant."))
    assert r.id.startswith("resp_"), r.id
    assert r.object == "response"
    assert r.status in ("completed", "incomplete"), r
    assert r.output_text, r
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.instructions == "You are a helpful assistant."
    assert r.temperature == 0 and r.max_output_tokens == 24 and r.store is False
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_incomplete() -> None:
    r = client.responses.create(**{**greedy(input="Write a long story about a dragon."), "max_output_tokens": 3})
    assert r.status == "incomplete", r
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_stream_accumulates_to_create() -> None:
    params = greedy(input=[{"role": "developer", "content": "You are a helpful assistant."},
                           {"role": "user", "content": [{"type": "input_text", "text": ASK}]}])
    whole = client.responses.create(**params)
    deltas, types, seqs = [], [], []
    with client.responses.stream(**params) as stream:
        for event in stream:
            types.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert final.output_text == whole.output_text, (final.output_text, whole.output_text)
    assert "".join(deltas) == whole.output_text
    assert seqs == list(range(len(seqs)))
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], types
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"], types
    assert final.usage.output_tokens == whole.usage.output_tokens


def weather_call(stream: bool):
    params = dict(model=MODEL, input="What is the weather in Paris?", tools=TOOLS, temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64)
    if not stream:
        return client.responses.create(**params)
    with client.responses.stream(**params) as s:
        args = "".join(e.delta for e in s if e.type == "response.function_call_arguments.delta")
        final = s.get_final_response()
    assert args == final.output[0].arguments
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_call(stream: bool) -> None:
    r = weather_call(stream)
    assert r.status == "completed", r
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1, r.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMS)


def test_streamed_call_equals_whole() -> None:
    assert weather_call(True).output[0].arguments == weather_call(False).output[0].arguments


def test_tool_round_trip() -> None:
    first = weather_call(False)
    call = first.output[0]
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature_c": 21})}]
    r = client.responses.create(model=MODEL, input=items, tools=TOOLS, tool_choice="none", temperature=0,
                                max_output_tokens=32)
    assert r.status in ("completed", "incomplete"), r
    assert [o.type for o in r.output] == ["message"], r.output
    assert r.output_text


def test_json_schema_output_validates() -> None:
    schema = City.model_json_schema()
    r = client.responses.create(model=MODEL, input="Name a city in France.", temperature=0, max_output_tokens=64,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_parse_with_pydantic_model() -> None:
    r = client.responses.parse(model=MODEL, input="Name a city in France.", text_format=City, temperature=0,
                               max_output_tokens=64)
    assert isinstance(r.output_parsed, City), r


@pytest.mark.parametrize("kw,param", [
    (dict(input="hi", store=True), "store"),
    (dict(input="hi", previous_response_id="resp_123"), "previous_response_id"),
    (dict(input="hi", background=True), "background"),
    (dict(input="hi", tools=[{"type": "web_search"}]), "tools[0].type"),
    (dict(input="hi", truncation="auto"), "truncation"),
    (dict(input="hi", reasoning={"effort": "high"}), "reasoning.effort"),
    (dict(input="hi", include=["message.output_text.logprobs"]), "include"),
    (dict(input=""), "input"),
    (dict(input=[]), "input"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
     "input[0].content[0].type"),
    (dict(input="hi", temperature="hot"), "temperature"),
    (dict(input="hi", text={"format": {"type": "grammar"}}), "text.format.type"),
    (dict(input="hi", extra_body={"frobnicate": 1}), "frobnicate"),
])
def test_bad_request(kw, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, **kw)
    assert info.value.status_code == 400
    body = info.value.body
    err = body.get("error", body)
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "BadRequestError"


@pytest.mark.parametrize("stream", [False, True])
def test_too_long_input_then_still_serving(stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hello " * 5000, max_output_tokens=4, stream=stream)
    assert info.value.status_code == 400
    r = client.responses.create(**greedy(input=ASK))
    assert r.output_text
