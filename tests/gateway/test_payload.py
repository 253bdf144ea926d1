"""The body a tailserve backend gets: the client's bytes with the backend's model name and the time
left appended, which its JSON parser (last value wins) reads as the merged object."""

from __future__ import annotations

import json

from tailserve.gateway.attempts import _append_keys


def test_appended_keys_override_the_clients() -> None:
    messages = [{"role": "user", "content": "é}"}]
    raw = json.dumps({"model": "public", "timeout": 30, "messages": messages})
    out = _append_keys((raw + " \n").encode(), {"model": "local", "timeout": 1.5})
    assert out is not None
    assert json.loads(out) == {"model": "local", "timeout": 1.5, "messages": messages}


def test_bodies_not_plain_utf8_objects_are_left_to_reserialize() -> None:
    raw = json.dumps({"model": "m"})
    assert _append_keys(raw.encode("utf-16"), {"timeout": 1.0}) is None
    assert _append_keys(raw.encode("utf-32-le"), {"timeout": 1.0}) is None
    assert _append_keys(b'{"model": "m"} x', {"timeout": 1.0}) is None
