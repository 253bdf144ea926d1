"""Tool calling's pure parts: validation, the call schema, the generic prompt format, parsing."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from tailserve.structured.tools import (
    CallScanner,
    TemplateTools,
    ToolError,
    call_schema,
    parse_calls,
    plan,
    render,
)
from tailserve.tokenizer import CHATML_TEMPLATE, GEMMA_TEMPLATE, Tokenizer

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


CONVERSATION = [
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


def test_render_writes_tools_calls_and_results() -> None:
    messages = CONVERSATION
    out, extra = render(messages, plan([WEATHER], "auto", None))
    assert extra == {}
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert out[3] == messages[2]
    assert all(isinstance(m["content"], str) for m in out)
    assert render(messages, plan([WEATHER], "none", None))[0][0]["role"] == "user"


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


def tokenizer_with(template: str) -> Tokenizer:
    backend = Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    return Tokenizer(
        backend, bos_token_id=None, eos_token_id=None, add_bos_token=False, chat_template=template
    )


# A template that handles tools itself, as Hermes/Qwen-style Hugging Face templates do.
NATIVE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
)


def test_template_tools_are_found_out() -> None:
    assert tokenizer_with(CHATML_TEMPLATE).template_tools == TemplateTools(native=False, tool_role=True)
    assert tokenizer_with(GEMMA_TEMPLATE).template_tools == TemplateTools(native=False, tool_role=False)
    assert tokenizer_with(NATIVE).template_tools == TemplateTools(native=True, tool_role=True)


def test_generic_format_keeps_gemmas_turns_alternating() -> None:
    gemma = tokenizer_with(GEMMA_TEMPLATE)
    follow_up = {"role": "user", "content": "And tomorrow?"}
    messages, extra = render([*CONVERSATION, follow_up], plan([WEATHER], "auto", None), gemma.template_tools)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3]["content"] == "Result of get_weather (call call_1): 12 C\n\nAnd tomorrow?"
    text = gemma.apply_chat_template(messages, **extra)  # Gemma's template raises on a tool role
    assert "Result of get_weather (call call_1): 12 C" in text and '"tool_calls"' in text


def test_native_template_gets_the_tools_and_calls() -> None:
    native = tokenizer_with(NATIVE)
    messages, extra = render(CONVERSATION, plan([WEATHER], "auto", None), native.template_tools)
    text = native.apply_chat_template(messages, **extra)
    assert text.startswith("TOOLS ") and '"get_weather"' in text.splitlines()[0]
    assert 'CALL get_weather {"city": "Oslo"}' in text and "tool: 12 C" in text


def test_streamed_call_deltas_add_up_to_the_calls() -> None:
    p = plan([WEATHER, TIME], "auto", None)
    text = (
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo \\"{x}\\" [1]"}}, '
        '{"name": "get_time", "arguments": {}}]}'
    )
    scan = CallScanner(p)
    deltas = [d for ch in text for d in scan.feed(ch)]
    whole = parse_calls(text, p)
    assert scan.finish() is not None and whole is not None
    openings = [d for d in deltas if "id" in d]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in openings] == [
        (0, "get_weather", ""),
        (1, "get_time", ""),
    ]
    fragments = [d for d in deltas if "id" not in d]
    assert len([d for d in fragments if d["index"] == 0]) > 1  # in fragments, not one blob
    for j, call in enumerate(whole):
        streamed = "".join(d["function"]["arguments"] for d in fragments if d["index"] == j)
        assert streamed == call["function"]["arguments"]
    assert json.loads(whole[0]["function"]["arguments"]) == {"city": 'Oslo "{x}" [1]'}


@pytest.mark.parametrize(
    ("text", "state"),
    [("It is sunny.", "text"), ('  {"tool_calls": [', "call"), ('{"answer": 1}', "text"), ("{", "start")],
)
def test_scanner_tells_text_from_a_call(text: str, state: str) -> None:
    scan = CallScanner(plan([WEATHER], "auto", None))
    scan.feed(text)
    assert scan.state == state


def test_calls_written_without_the_grammar_still_parse() -> None:
    p = plan([WEATHER], "auto", None)
    calls = parse_calls('{ "tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo"}}] }', p)
    assert calls is not None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
