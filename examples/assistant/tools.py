"""The assistant's tools, each with a configurable latency, and a share of calls that stall (the
unhappy path of a slow backend): a profile lookup, a policy loader, and a slow external shipping API.
Every tool takes the time it may use (`limit`), as a real client would pass it on as its timeout."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from assistant.store import Store
from tailserve.pipeline import ToolSpec
from tailserve.pipeline.cache import TTLCache, normalise


@dataclass(frozen=True)
class ToolLatency:
    profile_s: float = 0.05
    policy_s: float = 0.05
    shipping_s: float = 0.3  # the slow external API
    stall_share: float = 0.0  # share of calls (any tool) that stall
    stall_s: float = 10.0


NAMES = ("Ana Silva", "Ben Carter", "Chen Wei", "Dara Okafor", "Eli Novak", "Farah Haddad")


class Backends:
    """The services behind the tools. `calls` counts calls per tool (the benchmark reads it)."""

    def __init__(
        self, store: Store, latency: ToolLatency, policy_cache: TTLCache | None, seed: int = 0
    ) -> None:
        self.store = store
        self.latency = latency
        self.policy_cache = policy_cache
        self.rng = random.Random(seed)
        self.calls: dict[str, int] = {}
        self.stalls = 0

    async def _wait(self, name: str, seconds: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.rng.random() < self.latency.stall_share:
            self.stalls += 1
            seconds = self.latency.stall_s
        await asyncio.sleep(seconds)

    async def profile(self, user_id: str) -> dict[str, Any]:
        await self._wait("lookup_profile", self.latency.profile_s)
        n = sum(map(ord, user_id))
        return {
            "user_id": user_id,
            "name": NAMES[n % len(NAMES)],
            "tier": "Summit" if n % 3 == 0 else "Base",
            "points": 40 * (n % 50),
            "last_order": f"TO-{10000 + n % 9000}",
        }

    async def policy(self, topic: str) -> dict[str, Any]:
        """A policy article, post-processed into a short excerpt; the excerpt is deterministic in the
        normalised topic, so it is cached (the post-processing cache)."""
        key = normalise(topic)
        if self.policy_cache is not None:
            hit = self.policy_cache.get(key)
            if hit is not None:
                return hit
        await self._wait("load_policy", self.latency.policy_s)
        doc = self.store.by_topic(topic)
        out = (
            {"topic": topic, "found": False}
            if doc is None
            else {"title": doc.title, "excerpt": doc.text[:300]}
        )
        if self.policy_cache is not None:
            self.policy_cache.put(key, out)
        return out

    async def shipping(self, order_id: str) -> dict[str, Any]:
        await self._wait("shipping_status", self.latency.shipping_s)
        n = sum(map(ord, order_id))
        status = ("packed", "in transit with Nordpost", "out for delivery", "delivered")[n % 4]
        return {"order_id": order_id, "status": status, "days_left": n % 4}


def tool_specs(b: Backends, timeout_s: float) -> list[ToolSpec]:
    """The three tools as the model sees them, each capped at `timeout_s` (and the time left)."""

    def string_arg(name: str, desc: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: {"type": "string", "description": desc}},
            "required": [name],
        }

    async def profile(args: dict[str, Any], limit: float) -> Any:
        return await b.profile(str(args.get("user_id", "")))

    async def policy(args: dict[str, Any], limit: float) -> Any:
        return await b.policy(str(args.get("topic", "")))

    async def shipping(args: dict[str, Any], limit: float) -> Any:
        return await b.shipping(str(args.get("order_id", "")))

    return [
        ToolSpec("lookup_profile", "The customer's profile: name, tier, points, last order.",
                 string_arg("user_id", "the customer id"), profile, timeout_s),
        ToolSpec("load_policy", "The shop's policy on a topic (refunds, shipping, warranty, ...).",
                 string_arg("topic", "the policy topic"), policy, timeout_s),
        ToolSpec("shipping_status", "Where an order is now, from the carrier's API (slow).",
                 string_arg("order_id", "the order number, like TO-12345"), shipping, timeout_s),
    ]  # fmt: skip
