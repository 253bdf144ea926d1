"""A backend's own account of its load, as a tailserve server publishes it (server/load.py): the
`X-Tailserve-Load` header of its answers (`running=N;waiting=N;ttft=SECONDS;rate=TOKENS_PER_S`) and the
JSON of its `/load`.

Parsing is forgiving: a field that is missing or not a number is left out, never an error, so a
backend that publishes less (or something else under the name) routes on the gateway's own counts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

HEADER = "x-tailserve-load"


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


def _positive(value: Any) -> float | None:
    """A rate: a number > 0 (a rate of 0 would divide by zero, and says nothing measured)."""
    x = _number(value)
    return x if x else None


class Published(NamedTuple):
    """What a backend published; None where it left a field out."""

    waiting: float | None  # requests queued, not yet running
    ttft: float | None  # predicted seconds to a new request's first token
    running: float | None = None  # requests running
    rate: float | None = None  # prompt tokens it prefills per second: what a cold prefill there costs


def parse_header(value: str | None) -> Published:
    """What the header's value says; None where a field is absent."""
    fields: dict[str, str] = {}
    for part in (value or "").split(";"):
        name, _, v = part.partition("=")
        fields[name.strip()] = v.strip()
    return Published(
        _number(fields.get("waiting")),
        _number(fields.get("ttft")),
        _number(fields.get("running")),
        _positive(fields.get("rate")),
    )


def parse_json(body: Any) -> Published:
    """The same from `/load`'s JSON object."""
    if not isinstance(body, dict):
        return Published(None, None)
    return Published(
        _number(body.get("waiting")),
        _number(body.get("predicted_ttft_s")),
        _number(body.get("running")),
        _positive(body.get("prefill_tokens_per_s")),
    )
