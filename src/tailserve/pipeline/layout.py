"""Prompt layout for the server's prefix cache: stable content first — system, tool list, documents —
then the conversation and the turn, so consecutive requests share the longest possible prefix. A
`StableCheck` remembers each conversation's stable part and warns when it changed (a timestamp in the
system prompt, reordered tools or documents), since every such change silently costs a full prefill.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tailserve.pipeline.cache import TTLCache

log = logging.getLogger("tailserve.pipeline")


@dataclass(frozen=True)
class Layout:
    messages: list[dict[str, Any]]
    stable_key: str  # hash of the stable part: the instructions and the tools (documents vary by query)


def layout(
    system: str,
    documents: Sequence[str],
    conversation: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] = (),
) -> Layout:
    """One system message (instructions, then documents in the order given), then the conversation.

    Tools go in the request's `tools` field; the server writes them into the system message, after
    this text, so they are part of the stable prefix too and are hashed with it. Documents should come
    in a stable order (the retrieval's, for a cached query) for the prefix to repeat."""
    parts = [system.strip()]
    if documents:
        parts.append("Documents:\n" + "\n\n".join(f"[{i + 1}] {d.strip()}" for i, d in enumerate(documents)))
    stable = "\n\n".join(parts)
    digest = hashlib.sha256(
        json.dumps([parts[0], list(tools)], sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()[:16]
    convo = [m for m in conversation if m.get("role") != "system"]
    return Layout([{"role": "system", "content": stable}, *convo], digest)


class StableCheck:
    """Per conversation, the stable part's hash last seen; `changed` counts the requests whose
    stable part differed from their conversation's previous one."""

    def __init__(self, max_conversations: int = 4096, ttl_s: float = 3600.0) -> None:
        self._seen = TTLCache("stable-prefix", max_conversations, ttl_s)
        self.changed = 0

    def observe(self, conversation_id: str, stable_key: str) -> bool:
        """True (and a warning) when this conversation's stable part changed since its last request."""
        before = self._seen.get(conversation_id)
        self._seen.put(conversation_id, stable_key)
        if before is not None and before != stable_key:
            self.changed += 1
            log.warning(
                "conversation %s: the stable prompt prefix changed (%s -> %s); the server's prefix cache "
                "will miss it",
                conversation_id,
                before,
                stable_key,
            )
            return True
        return False
