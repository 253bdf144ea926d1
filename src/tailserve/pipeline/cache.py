"""TTL + LRU caches for results that are stable for a while: retrieval results and deterministic
post-processing (never whole answers). Keys are normalised inputs, so "What is the Refund policy? "
and "what is the refund policy?" share an entry. Hits, misses and expiries are counted here; the
metrics read them at scrape time.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\W_]+|[\s\W_]+$")


def normalise(text: str) -> str:
    """The cache key of a text input: Unicode NFKC, case-folded, whitespace collapsed, leading and
    trailing punctuation dropped (a question mark does not change what is retrieved)."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return _EDGE_PUNCT.sub("", _SPACE.sub(" ", t))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    expired: int = 0  # misses where an entry was present but too old
    evicted: int = 0  # entries pushed out by the size bound


_MISSING = object()


class TTLCache:
    """At most `max_entries` entries, each valid `ttl_s` seconds after it was stored; the least
    recently used goes first. `clock` is injectable (monotonic seconds)."""

    def __init__(
        self, name: str, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("a cache needs max_entries >= 1 and ttl_s > 0")
        self.name = name
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self.stats = CacheStats()
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The stored value (a hit), or `default` (a miss; an expired entry is dropped)."""
        entry = self._data.get(key, _MISSING)
        if entry is _MISSING:
            self.stats.misses += 1
            return default
        stored, value = entry  # type: ignore[misc]
        if self.clock() - stored >= self.ttl_s:
            del self._data[key]
            self.stats.misses += 1
            self.stats.expired += 1
            return default
        self._data.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = (self.clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.stats.evicted += 1

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value, else `await compute()` stored and returned (failures are not stored)."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = await compute()
            self.put(key, value)
        return value
