"""response_format against the live server with the default model: outputs parse and validate, streamed
or not, through the official client's structured-output helper too; bad schemas get a 400 naming why."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import API_KEY, MODEL, LiveServer

pytest.importorskip("llguidance", reason="structured outputs need the 'structured' extra")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.model

SHORT = {"type": "string", "maxLength": 40}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "paid", "shipped"]},
            "customer": {
                "type": "object",
                "properties": {"name": SHORT, "email": {"anyOf": [SHORT, {"type": "null"}]}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["status", "customer", "items"],
        "additionalProperties": False,
    },
    "colours": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}, "maxItems": 4},
}
MESSAGES = [{"role": "user", "content": "Describe a customer's order as JSON."}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_json_schema_stream_and_not(client: openai.OpenAI, server: LiveServer, name: str) -> None:
    schema = SCHEMAS[name]
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 0}
    r = client.chat.completions.create(response_format=schema_format(name, schema), **kw)
    assert r.choices[0].finish_reason == "stop"
    content = r.choices[0].message.content
    jsonschema.validate(json.loads(content), schema)
    chunks = client.chat.completions.create(response_format=schema_format(name, schema), stream=True, **kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content
    assert server.in_flight == 0


def test_sampled_outputs_validate(client: openai.OpenAI) -> None:
    schema = SCHEMAS["order"]
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=250,
        temperature=1.0,
        seed=7,
        n=4,
        response_format=schema_format("order", schema),
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_completions(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a name and a city."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(
        model=MODEL,
        prompt="A person, as JSON:",
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": schema_format("person", SCHEMAS["person"])},
    )
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMAS["person"])


class Item(BaseModel):
    sku: str = Field(max_length=20)
    qty: int


class Order(BaseModel):
    status: Literal["open", "paid", "shipped"]
    items: list[Item] = Field(max_length=3)


def test_openai_parse_helper_with_pydantic(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, max_tokens=200, temperature=0, response_format=Order
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Order)


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        (schema_format("x", {"type": "object", "not": {"required": ["a"]}}), '"not"'),
        (schema_format("x", {"type": "array", "uniqueItems": True}), '"uniqueItems"'),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "needs {'name'"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be an object"),
        ({"type": "yaml"}, "'yaml' is not supported"),
    ],
)
def test_bad_formats_get_400(server: LiveServer, response_format: dict, needle: str) -> None:
    r = httpx.post(
        server.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "response_format": response_format},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"].startswith("response_format")
    assert server.in_flight == 0


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather and the time in Paris and in Oslo?"}]


def reassemble(chunks) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_stream_and_not(client: openai.OpenAI, server: LiveServer, choice) -> None:
    kw = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice}
    kw |= {"max_tokens": 200, "temperature": 0}
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls and len({c.id for c in msg.tool_calls}) == len(msg.tool_calls)
    for c in msg.tool_calls:
        assert c.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(c.function.arguments), WEATHER["function"]["parameters"])
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["get_time"]
    calls, finish = reassemble(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in msg.tool_calls
    ]
    assert server.in_flight == 0


def test_parallel_tool_calls_off_gives_one_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    assert len(r.choices[0].message.tool_calls) == 1


def test_tool_results_in_the_conversation(client: openai.OpenAI) -> None:
    messages = [
        *ASK[:1],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=20,
        temperature=0,
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function", "function": {"name": "no spaces allowed"}}], "auto", "tools[0].function.name"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    ],
)
def test_bad_tools_get_400(server: LiveServer, tools: list, choice, param: str) -> None:
    r = httpx.post(
        server.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": ASK, "max_tokens": 5, "tools": tools, "tool_choice": choice},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def nested_one_of(depth: int) -> dict:
    """oneOf nested `depth` deep: the shape whose compile time explodes elsewhere (vLLM #54003)."""
    node: dict = {"type": "string"}
    for i in range(depth):
        node = {
            "oneOf": [
                {"type": "object", "properties": {f"a{i}": node, f"b{i}": {"type": "integer"}}},
                {"type": "array", "items": node},
            ]
        }
    return node


def test_explosive_schema_is_refused_quickly_while_others_are_served(server: LiveServer) -> None:
    def post(response_format: dict) -> httpx.Response:
        return httpx.post(
            server.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "temperature": 0}
            | {"response_format": response_format},
            timeout=60,
        )

    limit = server.engine.engine.config.grammar_timeout
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        bad = pool.submit(post, schema_format("deep", nested_one_of(12)))
        good = pool.submit(post, schema_format("person", SCHEMAS["person"]))
        r = bad.result()
        assert time.perf_counter() - t0 < limit
        assert r.status_code == 400 and "too large" in r.json()["error"]["message"]
        ok = good.result()
    assert ok.status_code == 200
    jsonschema.validate(json.loads(ok.json()["choices"][0]["message"]["content"]), SCHEMAS["person"])


def test_tool_choice_auto_streams_as_it_answers(client: openai.OpenAI) -> None:
    """Text or a call, whichever the model picks, streamed the same as not streamed."""
    kw = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "auto"}
    kw |= {"max_tokens": 48, "temperature": 0, "parallel_tool_calls": False}  # room for one whole call
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls, finish = reassemble(chunks)
    if msg.tool_calls:
        assert r.choices[0].finish_reason == finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in msg.tool_calls
        ]
    else:
        assert not calls and not msg.content.lstrip().startswith("{")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
