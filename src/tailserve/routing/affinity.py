"""The affinity key of a request: what it shares with others that a backend's prefix cache can reuse.

An explicit session (`X-Session-ID`, or the body's `user`) wins. Otherwise the key is the request's
leading content, which is what the prefix cache matches on: a chat's first message (its system prompt,
or the first user turn of a conversation without one) plus its tools, or a completion prompt's first
`PREFIX_CHARS` characters. Keying on the first message, not all earlier turns, keeps every turn of a
conversation on one key, and puts requests that share a system prompt together.

`prompt_size` is what the chooser weighs against a backend's wait: the request's prompt tokens, and
how many of them a backend that served its key lately has cached (the key's leading content; for a
session, every turn but the last). Both are estimated from characters, before any tokenizer, as the
server's admission estimates them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

PREFIX_CHARS = 1024
CHARS_PER_TOKEN = 4.0  # English BPE vocabularies, as server/admission.py's estimate


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _plain(message: Any) -> bool:
    """A message of a text role and text content alone."""
    return (
        isinstance(message, dict)
        and len(message) == 2
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def affinity_key(body: dict[str, Any], session: str | None = None) -> str | None:
    """A stable key for `body` (an OpenAI chat or completion request), or None if it has no content."""
    if session:
        return "session:" + session
    if isinstance(body.get("user"), str) and body["user"]:
        return "session:" + body["user"]
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first = messages[0]
        if not body.get("tools") and _plain(first):  # the common case, without serializing it
            return "prefix:" + _digest(f"{first['role']}\x00{first['content'][: PREFIX_CHARS * 4]}")
        lead = json.dumps([first, body.get("tools")], sort_keys=True, default=str)
        return "prefix:" + _digest(lead[: PREFIX_CHARS * 4])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if isinstance(prompt[0], (str, list)) else prompt
    if isinstance(prompt, str) and prompt:
        return "prefix:" + _digest(prompt[:PREFIX_CHARS])
    if isinstance(prompt, list) and prompt:
        return "prefix:" + _digest(json.dumps(prompt[: PREFIX_CHARS // 4]))
    return None


@dataclass(frozen=True)
class PromptSize:
    """A request's prompt, in estimated tokens: all of it, and the part a holder of its key has cached."""

    tokens: float
    shared: float


def _chars(message: Any) -> int:
    """The characters of one chat message's text content."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _tokens(prompt: Any, limit: int | None = None) -> float:
    """Estimated tokens of one completion prompt (text, or token ids), of its first `limit` characters."""
    if isinstance(prompt, str):
        return len(prompt[:limit]) / CHARS_PER_TOKEN
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return float(len(prompt[: None if limit is None else limit // 4]))
    return 0.0


def prompt_size(body: dict[str, Any], key: str | None) -> PromptSize:
    """The size of `body`'s prompt and of its part that `key` (its affinity key) stands for."""
    keyed = key is not None and not key.startswith("session:")
    messages = body.get("messages")
    if isinstance(messages, list):
        sizes = [_chars(m) for m in messages]
        tools = len(json.dumps(body["tools"])) if body.get("tools") else 0
        if key is None:
            shared = 0
        elif keyed:
            shared = sizes[0] + tools if sizes else 0
        else:
            shared = sum(sizes[:-1]) + tools
        return PromptSize((sum(sizes) + tools) / CHARS_PER_TOKEN, shared / CHARS_PER_TOKEN)
    prompt = body.get("prompt")
    one = not isinstance(prompt, list) or all(isinstance(t, int) for t in prompt)
    prompts = [prompt] if one else prompt
    first = prompts[0] if keyed and prompts else None
    return PromptSize(sum(map(_tokens, prompts)), _tokens(first, PREFIX_CHARS))
