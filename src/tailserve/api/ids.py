"""Request ids: the client's `X-Request-ID` when it sends one, else a fresh `<prefix><hex>`.

The id is echoed in the response's `X-Request-ID` and used as the response body's `id`; a gateway
forwards it so one id names the request on every hop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

HEADER = "X-Request-ID"


def new_request_id(prefix: str) -> str:
    """128 random bits in hex, as `uuid4().hex` but without building a UUID (it is on every request's
    critical path)."""
    return prefix + os.urandom(16).hex()


def request_id(headers: Mapping[str, str], prefix: str) -> tuple[str, bool]:
    """(the request's id, whether the client chose it)."""
    given = headers.get(HEADER.lower()) or headers.get(HEADER)
    if given:
        return given, True
    return new_request_id(prefix), False
