"""OpenAI tool calling over one generic prompt format (used for every model for now, also those
whose chat template handles tools; the default SmolLM2's does not).

The format (documented in README.md): a system message lists the tools as JSON and asks the model to
answer a call with exactly `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`; earlier
assistant calls are written back in that form and tool results as `tool` messages. With
`tool_choice` `required` or a named function the output is constrained to that JSON (one call for a
named function or `parallel_tool_calls: false`, else at most MAX_PARALLEL_CALLS); with `auto` the
model writes freely and output that parses as that JSON becomes `tool_calls`. Pure functions over
plain data; errors are ToolError(param, message).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# A small model under a grammar that allows "another call" may repeat calls until max_tokens.
MAX_PARALLEL_CALLS = 8


class ToolError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    tools: list[Tool]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None
    parallel: bool

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")


def plan(tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """Validate `tools`/`tool_choice`; None when the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice", "tool_choice needs tools")
        return None
    parsed: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}]", "each tool must be {'type': 'function', 'function': {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(
                f"tools[{i}].function.name", f"invalid function name {name!r} (a-z, A-Z, 0-9, _, -; 1-64)"
            )
        params = fn.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters", "parameters must be a JSON schema object")
        if any(p.name == name for p in parsed):
            raise ToolError(f"tools[{i}].function.name", f"function {name!r} is defined twice")
        parsed.append(Tool(name, str(fn.get("description") or ""), params))
    named = None
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(
                "tool_choice", f"tool_choice {tool_choice!r} is not none, auto, required or a function"
            )
        choice = tool_choice
    else:
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(named, str):
            raise ToolError(
                "tool_choice", "a named tool_choice is {'type': 'function', 'function': {'name': ...}}"
            )
        if all(t.name != named for t in parsed):
            raise ToolError("tool_choice", f"tool_choice names {named!r}, which is not among the tools")
        choice = "named"
    return ToolPlan(parsed, choice, named, parallel is not False)


def call_schema(p: ToolPlan) -> dict[str, Any]:
    """The JSON schema of the output when a call is required: one call, or several if parallel."""
    tools = [t for t in p.tools if p.named is None or t.name == p.named]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    array["maxItems"] = MAX_PARALLEL_CALLS if p.parallel and p.named is None else 1
    return {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def render(messages: list[dict[str, Any]], p: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages in the generic format, ready for any chat template; other messages pass unchanged (a
    malformed one still fails in the template, with its 400)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
            try:
                written = [
                    {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                    for c in m["tool_calls"]
                ]
            except (KeyError, TypeError):
                raise ToolError(
                    "messages", "tool_calls entries are {'function': {'name', 'arguments'}}"
                ) from None
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {
                "content": json.dumps({"tool_calls": written})
            }
        out.append(m)
    if p is None or p.choice == "none":
        return out
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in p.tools]
    )
    how = (
        "You can call these functions:\n" + listing + "\nTo call functions, answer with only this JSON: "
        '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
    )
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{how}"}
    else:
        out.insert(0, {"role": "system", "content": how})
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def parse_calls(text: str, p: ToolPlan) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` if `text` is a call in the generic format to known tools, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    calls = obj.get("tool_calls") if isinstance(obj, dict) else None
    names = {t.name for t in p.tools}
    if not isinstance(calls, list) or not calls:
        return None
    if any(not isinstance(c, dict) or c.get("name") not in names for c in calls):
        return None
    return [
        {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))},
        }
        for c in calls
    ]
