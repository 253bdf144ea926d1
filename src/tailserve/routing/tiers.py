"""Small/large routing: which tier of a model group answers a request, decided from the request alone.

A group is an ordered list of tiers, smallest (cheapest, fastest) first. A router maps a request to
one of them; anything with a `route(body, hint, tiers) -> TierChoice` method is a router (`TierRouter`),
so users plug in their own (a classifier, an embedding lookup) through the gateway config.

The default, `FeatureRouter`, is a handful of string scans, so it costs microseconds, not a model call.
Each feature that marks a request as hard adds its weight to a score, and the score picks the tier:
the first tier whose threshold it is below, the largest tier when it passes them all.

| feature | fires when | weight (default) |
|---|---|---|
| long prompt | the text of the prompt or messages has ≥ `long_prompt_chars` (2000) characters | 1.0 |
| code | a fence (```), or a line that starts like code (`def `, `class `, `import `, `#include`, ...) | 1.0 |
| math | LaTeX (`\\frac`, `$...$`), words like prove / integral / derivative, `x^2`-like terms | 1.0 |
| turns | the conversation has ≥ `many_turns` (4) user turns | 0.5 |
| tools | the request offers tools | 1.0 |

Thresholds: `[1.0]` for two tiers (any one strong feature → large; many turns alone stay small),
`[1.0, 2.0, ...]` for more. An explicit hint (the `X-Tailserve-Tier` header naming a tier) wins over
the score. The cost of a wrong "small" is bounded by escalation (`escalation_reason`): a small-tier
answer that fails a cheap check is re-run on the next tier up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

CODE = re.compile(
    r"```|^\s*(def|class|import|from \S+ import|#include|function|fn|public|SELECT|for \(|while \()\b",
    re.MULTILINE,
)
MATH = re.compile(
    r"\\(frac|int|sum|sqrt|lim|begin\{)|\$[^$\n]+\$|\b(prove|proof|integral|derivative|equation|theorem|"
    r"lemma|solve for|matrix|eigen\w*)\b|\b\w\s*\^\s*\d",
    re.IGNORECASE,
)
ESCALATE_REASONS = ("empty", "length", "invalid_json")


@dataclass(frozen=True)
class TierChoice:
    tier: str
    score: float
    reason: str  # what decided: "hint", "score", or the router's own word


class TierRouter(Protocol):
    def route(self, body: Mapping[str, Any], hint: str | None, tiers: Sequence[str]) -> TierChoice:
        """The tier (one of `tiers`, smallest first) for an OpenAI chat or completion `body`."""
        ...


@dataclass(frozen=True)
class Features:
    prompt_chars: int
    user_turns: int
    code: bool
    math: bool
    tools: bool


def _texts(body: Mapping[str, Any]) -> tuple[list[str], int]:
    """The text of a request's prompt or messages, and its number of user turns."""
    messages = body.get("messages")
    if isinstance(messages, list):
        out, turns = [], 0
        for m in messages:
            if not isinstance(m, dict):
                continue
            turns += m.get("role") == "user"
            content = m.get("content")
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return out, turns
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt], 1
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)], 1
    return [], 0


def prompt_chars(body: Mapping[str, Any]) -> int:
    """The characters of a request's prompt or messages: its size before tokenizing."""
    return sum(len(t) for t in _texts(body)[0])


def features(body: Mapping[str, Any]) -> Features:
    texts, turns = _texts(body)
    joined = "\n".join(texts)
    return Features(
        prompt_chars=len(joined),
        user_turns=turns,
        code=CODE.search(joined) is not None,
        math=MATH.search(joined) is not None,
        tools=bool(body.get("tools")),
    )


@dataclass(frozen=True)
class FeatureRouter:
    """The default router: the feature score of the module docstring against `thresholds`."""

    long_prompt_chars: int = 2000
    many_turns: int = 4
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"long_prompt": 1.0, "code": 1.0, "math": 1.0, "turns": 0.5, "tools": 1.0}
    )
    thresholds: Sequence[float] | None = None  # ascending, one fewer than the tiers; None: 1, 2, ...

    def score(self, f: Features) -> float:
        w = self.weights
        fired = {
            "long_prompt": f.prompt_chars >= self.long_prompt_chars,
            "code": f.code,
            "math": f.math,
            "turns": f.user_turns >= self.many_turns,
            "tools": f.tools,
        }
        return sum(w.get(name, 0.0) for name, on in fired.items() if on)

    def route(self, body: Mapping[str, Any], hint: str | None, tiers: Sequence[str]) -> TierChoice:
        if hint is not None and hint in tiers:
            return TierChoice(hint, 0.0, "hint")
        s = self.score(features(body))
        cuts = (
            list(self.thresholds) if self.thresholds is not None else [float(i) for i in range(1, len(tiers))]
        )
        index = sum(s >= c for c in cuts[: len(tiers) - 1])
        return TierChoice(tiers[index], s, "score")


def escalation_reason(
    body: Mapping[str, Any], answer: Mapping[str, Any], checks: Sequence[str]
) -> str | None:
    """Why a small tier's whole (non-streamed) `answer` to `body` should be re-run on a larger tier:
    "empty" (no text and no tool call), "length" (cut off by max_tokens), "invalid_json" (a JSON
    response_format was asked and the text does not parse); None when it passes every check in `checks`.
    """
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return "empty" if "empty" in checks else None
    for c in choices:
        if not isinstance(c, dict):
            continue
        message = c.get("message")
        text = message.get("content") if isinstance(message, dict) else c.get("text")
        tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
        if "empty" in checks and not (text or "").strip() and not tool_calls:
            return "empty"
        if "length" in checks and c.get("finish_reason") == "length":
            return "length"
        if "invalid_json" in checks and _wants_json(body) and not tool_calls:
            try:
                json.loads(text or "")
            except ValueError:
                return "invalid_json"
    return None


def _wants_json(body: Mapping[str, Any]) -> bool:
    rf = body.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")
