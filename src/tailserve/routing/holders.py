"""Which backends have served a key lately, hence hold its prefix in their caches.

The ring names one backend per key, but once a key has spilled (its backend was full) its prefix is
cached on a second backend too. Remembering that lets the chooser send the key's later requests to
whichever of its holders has room, instead of back to the ring's pick, where it would spill again
and, each time, turn another key's prefix cold. Bounded: the least recently used keys are forgotten
past `max_keys`, and a key keeps at most `max_per_key` holders, the most recent first.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_KEYS = 4096  # keys remembered per pool: a few hundred bytes each


class Holders:
    def __init__(self, max_keys: int = MAX_KEYS, max_per_key: int = 4) -> None:
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self._by_key: OrderedDict[str, list[str]] = OrderedDict()

    def of(self, key: str) -> list[str]:
        """The backends (names) that served `key`, the most recent first; [] for an unknown key."""
        return self._by_key.get(key, [])

    def served(self, key: str, backend: str) -> None:
        """`backend` took a request of `key`: it is the key's most recent holder now."""
        names = [backend, *(n for n in self._by_key.pop(key, []) if n != backend)]
        self._by_key[key] = names[: self.max_per_key]
        while len(self._by_key) > self.max_keys:
            self._by_key.popitem(last=False)

    def __len__(self) -> int:
        return len(self._by_key)
