"""OpenAI tool calling over one generic output format, whatever the chat template.

The format (documented in README.md): a system message lists the tools as JSON and asks the model to
answer a call with exactly `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`. With
`tool_choice` `required` or a named function the output is constrained to that JSON (one call for a
named function or `parallel_tool_calls: false`, else at most MAX_PARALLEL_CALLS); with `auto` it is
constrained to free text or that JSON (`auto_grammar`): text may not begin with `{`, so an answer
that does is a call, and is constrained from its first character.

The conversation: a template that handles tools itself (it reads `tools` and writes `tool_calls`,
`TemplateTools.native`) is given the tools and the assistant calls as they are (arguments decoded,
as Hugging Face templates expect); otherwise earlier calls are written back in the generic format,
and tool results stay `tool` messages where the template renders that role, else become user turns
("Result of NAME (call ID): ...") merged with neighbouring user turns, for templates such as Gemma
3's that insist on alternating user and model turns. Neither default model's GGUF template handles
tools (SmolLM2's writes any role as ChatML; Gemma 3's raises on a `tool` role).

Pure functions over plain data; errors are ToolError(param, message).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from tailserve.structured.grammar import JSON_OPTIONS

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


@dataclass(frozen=True)
class TemplateTools:
    """What a chat template does with tools (tokenizer.Tokenizer.template_tools finds out)."""

    native: bool = False  # reads `tools` and writes assistant `tool_calls` itself
    tool_role: bool = True  # renders a `tool` message (False: it raises or drops it)


def render(
    messages: list[dict[str, Any]], p: ToolPlan | None, template: TemplateTools = TemplateTools()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages for the chat template and the extra template variables (`tools` for a native
    template). Other messages pass unchanged (a malformed one still fails in the template, with its
    400)."""
    names: dict[str, str] = {}  # call id → function name, for tool results rendered as user turns
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
            calls = _calls_of(m["tool_calls"])
            names |= {c["id"]: c["name"] for c in calls if c["id"]}
            rest = {k: v for k, v in m.items() if k != "tool_calls"}
            if template.native:
                written = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ]
                m = rest | {"content": m.get("content") or "", "tool_calls": written}
            else:
                generic = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
                m = rest | {"content": json.dumps({"tool_calls": generic})}
        elif isinstance(m, dict) and m.get("role") == "tool" and not (template.native or template.tool_role):
            call = m.get("tool_call_id")
            name = m.get("name") or names.get(call, "the function")
            m = {"role": "user", "content": f"Result of {name} (call {call}): {m.get('content')}"}
        if out and m.get("role") == "user" == out[-1].get("role") and not template.tool_role:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
            continue
        out.append(m)
    if p is None or p.choice == "none":
        return out, {}
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
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in p.tools
    ]
    return out, {"tools": tools} if template.native else {}


def _calls_of(tool_calls: Any) -> list[dict[str, Any]]:
    try:
        return [
            {
                "id": c.get("id"),
                "name": c["function"]["name"],
                "arguments": _arguments(c["function"].get("arguments")),
            }
            for c in tool_calls
        ]
    except (KeyError, TypeError, AttributeError):
        raise ToolError("messages", "tool_calls entries are {'function': {'name', 'arguments'}}") from None


def auto_grammar(p: ToolPlan) -> str:
    """The llguidance lark grammar of `tool_choice: auto`: free text that does not begin with `{`
    (after blanks), or a call in the generic format, constrained like a required one."""
    schema = call_schema(p) | {"x-guidance": JSON_OPTIONS}
    return (
        "start: TEXT | call\n"
        "TEXT: /(?s:.+)/ & ~/(?s:[ \\t\\r\\n]*\\{.*)/\n"
        f"call: %json {json.dumps(schema)}\n"
    )


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def parse_calls(text: str, p: ToolPlan) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` if `text` is a call in the generic format to known tools, else None.

    Arguments are the JSON text the model wrote (so that a stream's fragments add up to exactly the
    same string); output the scanner cannot follow (another layout, written without a grammar) is
    parsed as JSON and its arguments re-serialized."""
    scan = CallScanner(p)
    scan.feed(text)
    calls = scan.finish()
    if calls is not None:
        return calls
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    found = obj.get("tool_calls") if isinstance(obj, dict) else None
    names = {t.name for t in p.tools}
    if not isinstance(found, list) or not found:
        return None
    if any(not isinstance(c, dict) or c.get("name") not in names for c in found):
        return None
    return [_call(c["name"], json.dumps(c.get("arguments", {}))) for c in found]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


PREFIX = '{"tool_calls": ['
OPEN = '{"name": "'
ARGS = '", "arguments": '


class CallScanner:
    """Follows output in the generic format as it streams, for deltas as OpenAI sends them: a call's
    index, id and name as soon as its name is complete, then its arguments in fragments as they come.

    It reads the layout the grammar writes (grammar.JSON_OPTIONS); `state` is "start" until the output
    is known to be a call ("call", then "done") or text ("text"), and "lost" if a call stops
    following the layout (truncated by max_tokens, or written without a grammar)."""

    def __init__(self, p: ToolPlan) -> None:
        self.names = {t.name for t in p.tools}
        self.buf = ""
        self.pos = 0  # what is consumed of buf
        self.state = "start"
        self.calls: list[dict[str, Any]] = []  # as OpenAI's tool_calls, arguments so far
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        """New deltas: {"index", "id", "type", "function": {"name", "arguments": ""}} opening a call,
        {"index", "function": {"arguments": fragment}} continuing it."""
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            before = (self.state, self.pos)
            step = getattr(self, "_" + self.state, None)
            if step is None:
                return out
            step(out)
            if (self.state, self.pos) == before:
                return out

    def finish(self) -> list[dict[str, Any]] | None:
        """The calls, if the output was complete calls."""
        return self.calls if self.state == "done" else None

    def _start(self, out: list) -> None:
        head = self.buf.lstrip()
        if len(head) < len(PREFIX) and PREFIX.startswith(head):
            return
        if head.startswith(PREFIX):
            self.pos = len(self.buf) - len(head) + len(PREFIX)
            self.state = "call"
        else:
            self.state = "text"

    def _expect(self, literal: str) -> bool | None:
        """True: `literal` is next (consumed); None: not known yet; False: something else is."""
        rest = self.buf[self.pos : self.pos + len(literal)]
        if rest == literal:
            self.pos += len(literal)
            return True
        return None if literal.startswith(rest) else False

    def _call(self, out: list) -> None:
        if not self.buf.startswith(OPEN, self.pos):
            if not OPEN.startswith(self.buf[self.pos :]):
                self.state = "lost"
            return
        end = self.buf.find(ARGS, self.pos + len(OPEN))
        name = self.buf[self.pos + len(OPEN) : end if end >= 0 else None]
        if end < 0:  # the name is still being written, or the layout is not ours
            quote = name.find('"')
            if len(name) > 64 + len(ARGS) or (quote >= 0 and not ARGS.startswith(name[quote:])):
                self.state = "lost"
            return
        if name not in self.names:
            self.state = "lost"
            return
        self.pos = end + len(ARGS)
        call = _call(name, "")
        self.calls.append(call)
        out.append(
            {
                "index": len(self.calls) - 1,
                "id": call["id"],
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        )
        self.state = "arguments"

    def _arguments(self, out: list) -> None:
        start, i = self.pos, self.pos
        ended = False
        while i < len(self.buf):
            c = self.buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                if self._depth == 0:
                    ended = True  # the call object's own closing brace
                    break
                self._depth -= 1
            i += 1
        if i > start:
            fragment = self.buf[start:i]
            self.calls[-1]["function"]["arguments"] += fragment
            out.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            self.pos = i
        if ended:
            self.state = "after"

    def _after(self, out: list) -> None:
        for literal, state in (("}, ", "call"), ("}]}", "done")):
            got = self._expect(literal)
            if got:
                self.state = state
                return
            if got is None:
                return
        self.state = "lost"
