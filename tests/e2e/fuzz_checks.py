"""What API fuzzing asserts of every answer (tests/e2e/test_fuzz.py and benchmarks/fuzz.py): no 5xx but
a request's own deadline (504 deadline_exceeded, from the fuzz server's short --request-timeout), every
error in the OpenAI envelope, every 200 stream ended by data: [DONE]."""

from __future__ import annotations

import json
from typing import Any

ENVELOPE = {"message", "type", "param", "code"}


def problems(status: int, content_type: str, body: bytes) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    found = []
    if status >= 400:
        try:
            data: Any = json.loads(body)
        except ValueError:
            return [f"{status}: the error body is not JSON: {body[:200]!r}"]
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict) or set(err) != ENVELOPE or not isinstance(err["message"], str):
            found.append(f"{status}: not the OpenAI error shape: {body[:200]!r}")
        elif status >= 500 and not (status == 504 and err["code"] == "deadline_exceeded"):
            found.append(f"{status}: a server error: {body[:300]!r}")
    elif content_type.startswith("text/event-stream") and not body.rstrip().endswith(b"data: [DONE]"):
        found.append(f"a stream that does not end with [DONE]: {body[-200:]!r}")
    return found
