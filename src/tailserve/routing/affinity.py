"""The affinity key of a request: what it shares with others that a backend's prefix cache can reuse.

An explicit session (`X-Session-ID`, or the body's `user`) wins. Otherwise the key is the request's
leading content, which is what the prefix cache matches on: a chat's first message (its system prompt,
or the first user turn of a conversation without one) plus its tools, or a completion prompt's first
`PREFIX_CHARS` characters. Keying on the first message, not all earlier turns, keeps every turn of a
conversation on one key, and puts requests that share a system prompt together.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX_CHARS = 1024


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def affinity_key(body: dict[str, Any], session: str | None = None) -> str | None:
    """A stable key for `body` (an OpenAI chat or completion request), or None if it has no content."""
    if session:
        return "session:" + session
    if isinstance(body.get("user"), str) and body["user"]:
        return "session:" + body["user"]
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        lead = json.dumps([messages[0], body.get("tools")], sort_keys=True, default=str)
        return "prefix:" + _digest(lead[: PREFIX_CHARS * 4])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if isinstance(prompt[0], (str, list)) else prompt
    if isinstance(prompt, str) and prompt:
        return "prefix:" + _digest(prompt[:PREFIX_CHARS])
    if isinstance(prompt, list) and prompt:
        return "prefix:" + _digest(json.dumps(prompt[: PREFIX_CHARS // 4]))
    return None
