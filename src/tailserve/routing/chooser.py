"""Which backend gets a request: prefix/session affinity bounded by load.

Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): each backend owns
points on a hash ring (in proportion to its weight); a request with an affinity key walks the ring from
its key's point and takes the first backend whose load, counting this request, stays within
`ceil(c · total · weight / total weight)`, c = `load_factor` ≥ 1. Requests without a key go to the
least loaded backend.

Before the ring, a key goes to a backend that served it lately (routing/holders.py), the least loaded
of those under the bound: once a key has spilled, both backends hold its prefix, and its requests
move between them as load shifts instead of going back to the ring's pick, spilling again, and each
time pushing a different key's prefix onto a backend where it is cold. Measured (BENCHMARKS.md,
"Affinity routing, fixed"): with 8 prompts over 2 backends at 8 in flight, the ring alone spilled a
third of its choices at the bound and turned 15 of the 16 possible (prompt, backend) pairs cold;
with holders, 7 % of choices spilled. The default c is 1.5: at 8 in flight over 2 backends, 1.25
allows 5 of 8 on one, which an even mix's random fluctuation reaches on ~10 % of choices, each
spill a cold prefill; 1.5 had the higher hit rate on the even mix in all four rounds measured
("Affinity routing, round 3").

A backend's predicted TTFT for THIS request weighs in within that bound: the wait it publishes (a
tailserve server's prediction for a new request before its own prefill starts: routing/load.py) plus
the request's own prefill there, its tokens not cached there at the backend's published prefill rate
(`request_ttft`). A backend holding the key has the key's part of the prompt (its system prompt,
tools, a session's earlier turns) cached, so only the rest; any other backend prefills all of it.
Among the backends under the bound, one whose expected TTFT exceeds the best one's both by
`ttft_slack` seconds and by the factor `ttft_ratio` is passed over, by the ring walk and by
least-loaded alike. Counts cannot see what makes a queue slow (long prompts queued, a slower
machine); the prediction can, and the bound still holds because the prediction only ever narrows the
set the bound allows. The request's own prefill is counted because the wait alone pushed keys off the
backend holding their prefix for an idle one where their whole prompt was cold (BENCHMARKS.md,
"Affinity routing, fixed": half the spills that remained). The test is relative as well as absolute
because predictions scale with the machine: where one prefill takes seconds, ordinary queue
differences are seconds too. Where a backend publishes no rate (or the caller gives no prompt size),
waits alone are compared, as before: adding a prefill to some backends and not others would favour
the ones that publish less.

`policy` picks the rule: "affinity" (the above), "least_loaded" (the same without the ring), or
"round_robin" (no load at all; a baseline to measure the others against).

Why this and not "matched prefix − β·load": the bound is a guarantee, not a tuning outcome. No backend
is ever given a request that would put it more than a factor c above the (weighted) mean, whatever the
prefix mix (one hot system prompt cannot pile onto one worker, the failure of the cache-aware routers
in vLLM's and SGLang's trackers), while a key still stays on its backends until they are full, so
its cached prefix keeps being reused. The score alternative needs the gateway to mirror every
backend's prefix tree, and a β that trades prefix tokens against queued requests, which has no right
value across prompt lengths; under a hot key it only softens the pile-up.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from tailserve.routing.affinity import PromptSize
from tailserve.routing.backends import Backend
from tailserve.routing.holders import Holders

POINTS_PER_WEIGHT = 64  # ring points per unit of weight: enough for an even split of keys
POLICIES = ("affinity", "least_loaded", "round_robin")
TTFT_MAX_AGE = 5.0  # seconds a published TTFT prediction is trusted
# Why a backend was chosen (`Chooser.decisions` counts them; the gateway exports the counts): the
# key's home (a backend that served it lately, else its ring pick); the next on the ring because the
# key's home (its most recent holder, else its ring pick) was over the load bound, or under it but
# passed over for its predicted TTFT, or unavailable (breaker, cap, cooling, already tried); the least
# loaded (no key, the least_loaded policy, a one-backend pool, or none under the bound); round robin.
REASONS = ("affinity", "spill_load", "spill_ttft", "spill_unavailable", "least_loaded", "round_robin")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def load_bound(backend: Backend, total: float, total_weight: float, load_factor: float) -> float:
    """The most load `backend` may hold when `total` requests (the new one included) are spread."""
    return math.ceil(load_factor * total * backend.weight / total_weight)


def request_ttft(
    waits: Mapping[str, float | None], rates: Mapping[str, float | None], uncached: Mapping[str, float]
) -> dict[str, float | None]:
    """Each backend's expected TTFT for one request: its published wait (None: unknown) plus the
    request's `uncached` prompt tokens there over its prefill rate. Waits alone where any backend with
    a known wait publishes no rate, so that all are compared alike."""
    known = [name for name, w in waits.items() if w is not None]
    if any(not rates.get(name) for name in known):
        return dict(waits)
    return {
        name: None if w is None else w + uncached[name] / rates[name]  # type: ignore[operator]
        for name, w in waits.items()
    }


class Chooser:
    """A ring over one pool of backends (a model's), and the choice rule above."""

    def __init__(
        self,
        backends: Sequence[Backend],
        load_factor: float = 1.5,
        policy: str = "affinity",
        ttft_slack: float = 0.25,
        ttft_ratio: float = 2.0,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if len({b.name for b in backends}) != len(backends):
            raise ValueError("backend names must be unique within a pool")
        self.backends = list(backends)
        self.load_factor = load_factor
        self.policy = policy
        self.ttft_slack = ttft_slack
        self.ttft_ratio = ttft_ratio
        self.holders = Holders(max_per_key=len(self.backends))
        self._by_name = {b.name: b for b in self.backends}
        self._turn = 0  # round_robin: where the next turn starts
        self.decisions: Counter[str] = Counter()  # choices made, by reason (REASONS)
        self.last_reason = ""  # the reason of the latest choice
        ring = []
        for i, b in enumerate(self.backends):
            for p in range(max(1, round(POINTS_PER_WEIGHT * b.weight))):
                ring.append((_hash(f"{b.name}#{p}"), i))
        ring.sort()
        self._points = [h for h, _ in ring]
        self._owners = [i for _, i in ring]

    def choose(
        self,
        key: str | None,
        now: float,
        tried: Collection[str] = (),
        prompt: PromptSize | None = None,
    ) -> Backend | None:
        """The backend for a request with affinity `key` (None: no affinity) and prompt size `prompt`
        (None: unknown; backends' waits are then compared alone), or None if none is available.
        Backends in `tried` (already failed this request) are taken only when no other is available.
        Counts the choice's reason in `decisions` and leaves it in `last_reason`; remembers the backend
        as a holder of `key`."""
        backend, reason = self._decide(key, now, tried, prompt)
        if backend is not None:
            self.decisions[reason] += 1
            self.last_reason = reason
            if key is not None and self.policy == "affinity":
                self.holders.served(key, backend.name)
        return backend

    def _decide(
        self, key: str | None, now: float, tried: Collection[str], prompt: PromptSize | None
    ) -> tuple[Backend | None, str]:
        ready = [b for b in self.backends if b.available(now)]
        fresh = [b for b in ready if b.name not in tried]
        pool = fresh or ready
        if not pool:
            return None, ""
        if self.policy == "round_robin":
            return self._round_robin(pool), "round_robin"
        if len(pool) == 1:  # nothing to weigh: spares the bound and the TTFT estimates
            return pool[0], "least_loaded"
        under = self._under_bound(pool)
        held_names = self.holders.of(key) if key is not None else []
        allowed = self._fast_enough(under, now, prompt, held_names)
        if key is None or self.policy == "least_loaded":
            return self._least_loaded(allowed or pool), "least_loaded"
        names = {b.name for b in allowed}
        held = [self._by_name[n] for n in held_names if n in self._by_name]
        room = [b for b in held if b.name in names]
        if room:  # the least loaded of the backends holding its prefix; the most recent on a tie
            return min(room, key=lambda b: ((b.load + 1) / b.weight, held.index(b))), "affinity"
        start = bisect.bisect(self._points, _hash(key))
        n = len(self._points)
        seen: list[int] = []
        for k in range(n):
            i = self._owners[(start + k) % n]
            if i in seen:
                continue
            seen.append(i)
            if self.backends[i].name in names:
                home = held[0] if held else self.backends[seen[0]]
                reason = "affinity" if home is self.backends[i] else self._spill_reason(home, pool, under)
                return self.backends[i], reason
            if len(seen) == len(self.backends):
                break
        # Fractional reported loads can leave none under its bound.
        return self._least_loaded(pool), "least_loaded"

    @staticmethod
    def _spill_reason(home: Backend, pool: list[Backend], under: list[Backend]) -> str:
        """Why the key's home was passed over."""
        if home not in pool:
            return "spill_unavailable"
        return "spill_ttft" if home in under else "spill_load"

    def _under_bound(self, pool: list[Backend]) -> list[Backend]:
        """The backends of `pool` that one more request leaves within their load bound."""
        total = sum(b.load for b in pool) + 1
        weight = sum(b.weight for b in pool)
        return [b for b in pool if b.load + 1 <= load_bound(b, total, weight, self.load_factor)]

    def _fast_enough(
        self, under: list[Backend], now: float, prompt: PromptSize | None, held: Collection[str]
    ) -> list[Backend]:
        """`under` less those whose expected TTFT for this request (`request_ttft`; a backend in `held`
        has the key's part of `prompt` cached) is above the best among them by more than `ttft_slack`
        seconds and more than `ttft_ratio` times (all of them, if none has a fresh prediction)."""
        waits = {b.name: b.predicted_ttft(now, TTFT_MAX_AGE) for b in under}
        ttft = waits
        if prompt is not None:
            rates = {b.name: b.reported_rate for b in under}
            uncached = {b.name: prompt.tokens - (prompt.shared if b.name in held else 0.0) for b in under}
            ttft = request_ttft(waits, rates, uncached)
        known = [t for t in ttft.values() if t is not None]
        if not known:
            return under
        best = min(known)
        limit = max(best + self.ttft_slack, best * self.ttft_ratio)
        return [b for b in under if (ttft[b.name] or 0.0) <= limit]

    def explain(self, key: str | None, backend: Backend, now: float) -> str:
        """One line on the latest choice, for a debug log: the key, the backend, why, and what each
        backend's load and prediction were (the chosen one counted before its request)."""
        parts = [f"key={key} backend={backend.name} reason={self.last_reason}"]
        for b in self.backends:
            ttft = b.predicted_ttft(now, TTFT_MAX_AGE)
            parts.append(
                f"{b.name}: in_flight={b.in_flight} reported={b.reported_running:g}+{b.reported_waiting:g}"
                f"@{b.reported_own} "
                f"load={b.load:g} ttft={'-' if ttft is None else f'{ttft:.3f}'} "
                f"rate={'-' if b.reported_rate is None else f'{b.reported_rate:.0f}'}"
            )
        return " | ".join(parts)

    def _round_robin(self, pool: list[Backend]) -> Backend:
        names = {b.name for b in pool}
        for k in range(len(self.backends)):
            b = self.backends[(self._turn + k) % len(self.backends)]
            if b.name in names:
                self._turn = (self._turn + k + 1) % len(self.backends)
                return b
        return pool[0]

    def rank(
        self, key: str | None, now: float, tried: Collection[str] = (), prompt: PromptSize | None = None
    ) -> list[Backend]:
        """Every available backend, best first: `choose`'s pick, then the others least loaded first (those
        in `tried` last). A caller that can be turned away by its pick (it is full after all) goes on
        down the list instead of asking again."""
        first = self.choose(key, now, tried, prompt)
        if first is None:
            return []
        rest = [b for b in self.backends if b is not first and b.available(now)]
        rest.sort(key=lambda b: (b.name in tried, (b.load + 1) / b.weight, b.in_flight, b.name))
        return [first, *rest]

    @staticmethod
    def _least_loaded(pool: list[Backend]) -> Backend:
        return min(pool, key=lambda b: ((b.load + 1) / b.weight, b.in_flight, b.name))

    def wait_hint(self, now: float) -> float:
        """Seconds until some backend takes requests again (for Retry-After when none does now)."""
        return min((b.wait_hint(now) for b in self.backends), default=0.0)
