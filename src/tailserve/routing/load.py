"""A backend's own account of its load, as a tailserve server publishes it (server/load.py): the
`X-Tailserve-Load` header of its answers (`waiting=N;ttft=SECONDS`) and the JSON of its `/load`.

Parsing is forgiving: a field that is missing or not a number is left out, never an error, so a
backend that publishes less (or something else under the name) routes on the gateway's own counts.
"""

from __future__ import annotations

import math
from typing import Any

HEADER = "x-tailserve-load"


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


def parse_header(value: str | None) -> tuple[float | None, float | None]:
    """(waiting requests, predicted TTFT in seconds) from the header's value; None where absent."""
    fields: dict[str, str] = {}
    for part in (value or "").split(";"):
        name, _, v = part.partition("=")
        fields[name.strip()] = v.strip()
    return _number(fields.get("waiting")), _number(fields.get("ttft"))


def parse_json(body: Any) -> tuple[float | None, float | None]:
    """The same from `/load`'s JSON object."""
    if not isinstance(body, dict):
        return None, None
    return _number(body.get("waiting")), _number(body.get("predicted_ttft_s"))
