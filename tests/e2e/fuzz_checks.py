"""What API fuzzing asserts of every answer (tests/e2e/test_fuzz.py and benchmarks/fuzz.py): no 5xx but
a request's own deadline (504 deadline_exceeded, from the fuzz server's short --request-timeout), every
error in the OpenAI envelope, every 200 stream ended by data: [DONE]."""

from __future__ import annotations

import json
from collections import Counter
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


def fuzz(url: str, examples: int, hang_s: float = 30.0) -> tuple[Counter[str], list[str]]:
    """Fuzz every operation of `url`'s /openapi.json with `examples` generated cases each: the answers'
    statuses, and what was wrong (problems, hangs, dropped connections)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            where = case.operation.label
            try:
                r = case.call(base_url=url, timeout=hang_s)
            except Exception as e:  # a hang (timeout) or a dropped connection
                failures.append(f"{where}: {type(e).__name__}: {e}")
                return
            statuses[str(r.status_code)] += 1
            kind = r.headers.get("content-type") or [""]  # schemathesis: each header's list of values
            found = problems(r.status_code, kind[0], r.content)
            failures.extend(f"{where}: {p}" for p in found)

        run()
    return statuses, failures
