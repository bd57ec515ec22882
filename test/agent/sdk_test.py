"""The agent-era API through the official openai Python SDK, against a running govllm.

Run by agent's Go TestPythonSDK with GOVLLM_URL (the server), GOVLLM_MODEL and GOVLLM_BACKEND;
the server serves the default model with --enable-auto-tool-choice --tool-call-parser hermes and
templates/chatml_tools.jinja. Greedy decoding throughout: the constraint, not the model, makes
the outputs valid, and each test checks what the feature alone guarantees.
"""

from __future__ import annotations

import json
import os
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

URL = os.environ.get("GOVLLM_URL", "http://127.0.0.1:8000")
MODEL = os.environ.get("GOVLLM_MODEL", "SmolLM2-135M-Instruct")
client = openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=300)


class City(BaseModel):
    """What parse() asks for: a bounded string and an enum, so greedy output always ends."""

    name: str = Field(max_length=16)
    country: Literal["France", "Spain", "Italy"]


WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 16}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
PARAMS_BY_NAME = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_parse_with_pydantic_model() -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a city in France."}],
        response_format=City, temperature=0, max_tokens=64)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, City), choice.message
    assert len(choice.message.parsed.name) <= 16


def test_json_schema_strict_validates() -> None:
    schema = City.model_json_schema()
    schema["additionalProperties"] = False
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a city."}], temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    text = completion.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_json_object() -> None:
    completion = client.chat.completions.create(
        # Unconstrained, the model answers this in prose ("Paris is the capital of France.").
        model=MODEL, messages=[{"role": "user", "content": "Name the capital of France in one word, then give it as JSON."}],
        temperature=0, max_tokens=100, response_format={"type": "json_object"})
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_choice_and_regex(stream: bool) -> None:
    for extra, check in [
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda s: s in ("yes", "no", "maybe")),
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}, lambda s: re.fullmatch("[0-9]{3}-[a-z]{2}", s)),
    ]:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Answer."}], temperature=0, max_tokens=20,
                      extra_body=extra)
        if stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        assert check(text), (extra, text)


def _check_calls(calls, names: set[str]) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function"
        assert call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS_BY_NAME[call.function.name])


def test_tool_choice_required_validates() -> None:
    completion = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                temperature=0, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_tool_choice_required_not_parallel() -> None:
    completion = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=0, max_tokens=200)
    calls = completion.choices[0].message.tool_calls
    _check_calls(calls, {"get_weather", "get_time"})
    assert len(calls) == 1


def test_named_tool_choice_validates() -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = completion.choices[0]
    _check_calls(choice.message.tool_calls, {"get_weather"})
    assert len(choice.message.tool_calls) == 1


class GetWeather(BaseModel):
    city: str = Field(max_length=16)
    unit: Literal["celsius", "fahrenheit"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "GetWeather"}}])
def test_stream_helper_accumulates_tool_calls(tool_choice) -> None:
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
                                        tool_choice=tool_choice, temperature=0, max_tokens=100) as stream:
        deltas = [event for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) >= 1 and calls[0].function.name == "GetWeather"
    assert isinstance(calls[0].function.parsed_arguments, GetWeather)
    assert len(deltas) > 1, "the arguments were not streamed in pieces"


# Auto tool choice: the hermes parser reads the model's text. A regex makes the default model
# write a hermes call, so the parser (not the constraint) is what this tests.
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes(stream: bool) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=100,
                  extra_body={"structured_outputs": {"regex": re.escape(HERMES_CALL)}})
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
        assert not choice.message.content
    else:
        with client.chat.completions.stream(**kwargs) as s:
            for _ in s:
                pass
            choice = s.get_final_completion().choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_auto_tool_choice_plain_answer_is_content() -> None:
    choice = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["It is sunny."]}}).choices[0]
    assert choice.message.content == "It is sunny."
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_tool_result_round_trip() -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=16, extra_body={"return_token_ids": True})
    assert second.choices[0].message.content
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "..", "models", MODEL))
    prompt = tok.decode(second.model_extra["prompt_token_ids"])
    assert "<tool_response>" in prompt and "22 degrees and sunny" in prompt, prompt
    assert '"name": "get_weather"' in prompt and json.loads(call.function.arguments)["city"] in prompt, prompt


def test_logit_bias() -> None:
    base = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=1,
                extra_body={"return_token_ids": True})
    greedy = client.chat.completions.create(**base).choices[0].model_extra["token_ids"][0]
    banned = client.chat.completions.create(logit_bias={str(greedy): -100}, **base).choices[0]
    assert banned.model_extra["token_ids"][0] != greedy
    forced = client.chat.completions.create(logit_bias={"1000": 100}, **base).choices[0]
    assert forced.model_extra["token_ids"][0] == 1000


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"structured_outputs": {"grammar": "root ::= ( \"a\" "}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
])
def test_bad_input_is_400_naming_the_field(body, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)
    assert info.value.body.get("param") == param, info.value.body
    # The server keeps serving.
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices[0].finish_reason
