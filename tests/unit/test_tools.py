"""Tool calling's pure parts: validation, the call schema, the generic prompt format, parsing."""

from __future__ import annotations

import json

import pytest

from tailserve.structured.tools import ToolError, call_schema, parse_calls, plan, render

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("tools", "choice", "param", "needle"),
    [
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name", "invalid"),
        ([{"type": "retrieval"}], None, "tools[0]", "each tool"),
        ([WEATHER, WEATHER], None, "tools[1].function.name", "twice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "'nope'"),
        ([WEATHER], "sometimes", "tool_choice", "'sometimes'"),
        (None, "required", "tool_choice", "needs tools"),
    ],
)
def test_bad_tools_are_named(tools: list, choice: object, param: str, needle: str) -> None:
    with pytest.raises(ToolError, match=needle) as e:
        plan(tools, choice, None)
    assert e.value.param == param


def test_choices() -> None:
    assert plan(None, None, None) is None
    assert plan([WEATHER], None, None).choice == "auto"
    p = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, True)
    assert (p.choice, p.named, p.constrained) == ("named", "get_time", True)
    assert not plan([WEATHER], "none", None).constrained


def test_call_schema_limits_calls_and_names() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    one = call_schema(plan([WEATHER, TIME], "required", False))
    many = call_schema(plan([WEATHER, TIME], "required", None))
    named = call_schema(plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, True))
    two = {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "get_time", "arguments": {}},
        ]
    }
    jsonschema.validate(two, many)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(two, one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "x"}}]}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {}}]}, many)


def test_render_writes_tools_calls_and_results() -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ]
    out = render(messages, plan([WEATHER], "auto", None))
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert out[3] == messages[2]
    assert all(isinstance(m["content"], str) for m in out)
    assert render(messages, plan([WEATHER], "none", None))[0]["role"] == "user"


def test_parse_calls() -> None:
    p = plan([WEATHER, TIME], "auto", None)
    text = json.dumps(
        {
            "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "Oslo"}},
                {"name": "get_time", "arguments": {}},
            ]
        }
    )
    calls = parse_calls(text, p)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert len({c["id"] for c in calls}) == 2
    assert parse_calls("It is sunny.", p) is None
    assert parse_calls('{"tool_calls": [{"name": "unknown", "arguments": {}}]}', p) is None
