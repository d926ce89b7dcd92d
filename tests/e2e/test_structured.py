"""Structured output and tool calls, through the official `openai` SDK and its helpers: `response_format`
(json_object, json_schema, the SDK's `parse` with a pydantic model), `tools` with each `tool_choice`,
calls streamed as deltas (the SDK's `stream` helper accumulates them), tool results in the history, with
any adaptation, and the errors for what cannot work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from t2_harness import BASE_MODEL, http_request, post_json

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0},
        "continent": {"enum": ["Africa", "America", "Asia", "Europe", "Oceania"]},
    },
    "required": ["city", "population", "continent"],
    "additionalProperties": False,
}
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
CITY_PROMPT = [{"role": "user", "content": "Name a big city, its population and its continent."}]

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_PARAMS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers",
                                      "parameters": ADD_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
WEATHER_PROMPT = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_calls(calls, only: str | None = None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function"
        assert c.id.startswith("call_")
        if only:
            assert c.function.name == only
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_json_schema_answer_fits_the_schema(client):
    r = client.chat.completions.create(model=BASE_MODEL, messages=CITY_PROMPT, max_tokens=100,
                                       temperature=0, response_format=CITY_FORMAT)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    jsonschema.validate(json.loads(c.message.content), CITY_SCHEMA)


def test_without_the_schema_the_same_request_is_not_that_json(client):
    # The control: what the model says unconstrained is not an object of that shape.
    r = client.chat.completions.create(model=BASE_MODEL, messages=CITY_PROMPT, max_tokens=100, temperature=0)
    try:
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY_SCHEMA)
        fits = True
    except (ValueError, jsonschema.ValidationError):
        fits = False
    assert not fits, r.choices[0].message.content


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=20)


class Owner(BaseModel):
    name: str = Field(max_length=20)
    age: int
    pets: list[Pet] = Field(max_length=2)


def test_sdk_parse_with_a_pydantic_model(client):
    # The SDK turns the model into a strict JSON schema (with $defs and $ref) and parses the answer back.
    r = client.chat.completions.parse(model=BASE_MODEL, max_tokens=150, temperature=0,
                                      messages=[{"role": "user", "content": "Describe a pet owner."}],
                                      response_format=Owner)
    owner = r.choices[0].message.parsed
    assert isinstance(owner, Owner)
    assert len(owner.pets) <= 2


def test_json_schema_streamed_with_n_and_sampling(client):
    stream = client.chat.completions.create(model=BASE_MODEL, messages=CITY_PROMPT, max_tokens=100, n=2,
                                            temperature=1.0, seed=5, stream=True, response_format=CITY_FORMAT)
    texts = ["", ""]
    finish = [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    for text, f in zip(texts, finish):
        assert f == "stop", text
        jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_json_object_mode_and_text_completions(client):
    r = client.chat.completions.create(model=BASE_MODEL, max_tokens=60, temperature=0,
                                       messages=[{"role": "user", "content": "Reply with a JSON object with a key ok."}],
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    r = client.completions.create(model=BASE_MODEL, prompt="The capital of France:", max_tokens=100, temperature=0,
                                  extra_body={"response_format": CITY_FORMAT})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), CITY_SCHEMA)


@pytest.mark.parametrize("model,extra", [
    (f"{BASE_MODEL}:math", {}),
    (BASE_MODEL, {"adaptation": {"mix": {"math": 0.5, "code": 0.5}}}),
    (f"{BASE_MODEL}:auto", {}),
])
def test_structured_output_with_any_adaptation(client, model, extra):
    r = client.chat.completions.create(model=model, messages=CITY_PROMPT, max_tokens=100, temperature=0,
                                       response_format=CITY_FORMAT, extra_body=extra)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY_SCHEMA)


@pytest.mark.parametrize("response_format,says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}, "strng"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}, "nope"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "name"),
    ({"type": "yaml"}, "yaml"),
])
def test_invalid_response_formats_are_400_naming_the_problem(client, response_format, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE_MODEL, messages=CITY_PROMPT, max_tokens=5,
                                       response_format=response_format)
    err = e.value.body
    assert err["param"] == "response_format"
    assert says in err["message"]


def test_tool_choice_required_returns_calls_that_fit_the_schemas(client):
    r = client.chat.completions.create(model=BASE_MODEL, messages=WEATHER_PROMPT, max_tokens=120, temperature=0,
                                       tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    check_calls(c.message.tool_calls)
    assert len(c.message.tool_calls) == 1


def test_named_tool_choice_calls_that_function(client):
    r = client.chat.completions.create(model=BASE_MODEL, messages=WEATHER_PROMPT, max_tokens=120, temperature=0,
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    check_calls(c.message.tool_calls, only="add")
    assert len(c.message.tool_calls) == 1


def test_auto_answers_in_text_or_with_valid_calls_and_none_never_calls(client):
    for prompt in (WEATHER_PROMPT, [{"role": "user", "content": "Say hello."}]):
        r = client.chat.completions.create(model=BASE_MODEL, messages=prompt, max_tokens=120, temperature=0,
                                           tools=TOOLS)
        c = r.choices[0]
        if c.message.tool_calls:
            check_calls(c.message.tool_calls)
            assert c.finish_reason in ("tool_calls", "length")
        else:
            assert c.message.content and "<tool_call>" not in c.message.content
        r = client.chat.completions.create(model=BASE_MODEL, messages=prompt, max_tokens=40, temperature=0,
                                           tools=TOOLS, tool_choice="none")
        assert not r.choices[0].message.tool_calls
        assert r.choices[0].message.content


def test_auto_with_sampling_only_ever_returns_valid_calls(client):
    # Sampled answers that start a call are held to the schemas from there on.
    seen_calls = 0
    for seed in range(6):
        r = client.chat.completions.create(model=BASE_MODEL, messages=WEATHER_PROMPT, max_tokens=120,
                                           temperature=1.0, seed=seed, tools=TOOLS)
        c = r.choices[0]
        if c.message.tool_calls and c.finish_reason == "tool_calls":
            check_calls(c.message.tool_calls)
            seen_calls += 1
    print(f"{seen_calls} of 6 sampled answers called a tool")


def test_sdk_stream_helper_accumulates_streamed_calls(client):
    class GetWeather(BaseModel):
        city: str = Field(max_length=30)
        unit: Literal["celsius", "fahrenheit"]

    with client.chat.completions.stream(model=BASE_MODEL, messages=WEATHER_PROMPT, max_tokens=120, temperature=0,
                                        tools=[openai.pydantic_function_tool(GetWeather)],
                                        tool_choice="required", parallel_tool_calls=False) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert final.choices[0].finish_reason == "tool_calls"


def test_streamed_calls_equal_the_whole_answers_calls(client):
    kwargs = dict(model=BASE_MODEL, messages=WEATHER_PROMPT, max_tokens=120, temperature=0, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    streamed = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                streamed.setdefault(d.index, {"name": "", "arguments": ""})
                streamed[d.index]["name"] += d.function.name or ""
                streamed[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole] == \
        [(s["name"], s["arguments"]) for _, s in sorted(streamed.items())]


def test_tool_results_in_the_history_reach_the_prompt(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    history = WEATHER_PROMPT + [{"role": "assistant", "content": None, "tool_calls": [call]}]

    def prompt_tokens(result: str) -> int:
        msgs = history + [{"role": "tool", "tool_call_id": "call_1", "content": result}]
        r = client.chat.completions.create(model=BASE_MODEL, messages=msgs, max_tokens=20, temperature=0,
                                           tools=TOOLS)
        assert r.choices[0].message.content or r.choices[0].message.tool_calls
        return r.usage.prompt_tokens

    short, long = prompt_tokens("18"), prompt_tokens("18 degrees, light rain, wind from the west at 20 km/h")
    assert long > short


@pytest.mark.parametrize("body,param,says", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "always"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}],
      "tool_choice": "required"}, "tools", "strng"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tools"),
])
def test_invalid_tool_requests_are_400(base_url, body, param, says):
    r = post_json(base_url, "/v1/chat/completions",
                  {"model": BASE_MODEL, "messages": WEATHER_PROMPT, "max_tokens": 5, **body})
    assert r.status == 400, r
    err = r.json()["error"]
    assert err["param"] == param
    assert says in err["message"]


def test_tools_on_text_completions_are_400(base_url):
    r = post_json(base_url, "/v1/completions",
                  {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 5, "tools": TOOLS})
    assert r.status == 400 and r.json()["error"]["param"] == "tools"


def test_mask_time_is_measured(base_url, client):
    client.chat.completions.create(model=BASE_MODEL, messages=CITY_PROMPT, max_tokens=30, temperature=0,
                                   response_format=CITY_FORMAT)
    text = http_request(base_url, "GET", "/metrics").text
    count = [line for line in text.splitlines() if line.startswith("t2_structured_mask_seconds_count")]
    assert count and float(count[0].split()[-1]) > 0


def test_node_sdk_tool_helpers(server):
    """The official Node SDK: runTools calls a local function with the model's arguments and sends the
    result back as a tool message; the stream helper accumulates the streamed call; parse reads JSON."""
    script = Path(__file__).parent / "node" / "tools.mjs"
    env = {**os.environ, "T2_BASE_URL": server.base_url + "/v1", "T2_MODEL": BASE_MODEL}
    out = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(r["runTools"]["calledWith"]) == 1
    jsonschema.validate(r["runTools"]["calledWith"][0], WEATHER_PARAMS)
    assert r["runTools"]["roles"][:3] == ["user", "assistant", "tool"]
    assert r["stream"]["finish"] == "tool_calls"
    (name, args), = r["stream"]["calls"]
    assert name == "get_weather" and r["stream"]["doneArgs"] == [args]
    jsonschema.validate(json.loads(args), WEATHER_PARAMS)
    assert r["parse"]["finish"] == "stop"
    assert isinstance(r["parse"]["parsed"]["population"], int)
