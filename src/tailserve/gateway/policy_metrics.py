"""The latency policies' metrics, in the gateway's registry and naming (`tailserve:gateway_`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from tailserve.gateway.metrics import G

# The router runs on every request of a group: its histogram resolves microseconds.
ROUTER_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class PolicyMetrics:
    def __init__(self, reg: CollectorRegistry) -> None:
        self.hedges = Counter(
            G + "hedges",
            "Hedged attempts: sent, won (the hedge gave the first token), cancelled (losers closed).",
            ["model", "event"],
            registry=reg,
        )
        self.router_seconds = Histogram(
            G + "router_seconds",
            "Time the tier router took to decide, per group.",
            ["model"],
            registry=reg,
            buckets=ROUTER_BUCKETS,
        )
        self.tier_requests = Counter(
            G + "tier_requests",
            "Requests of a group by the tier that served them.",
            ["model", "tier"],
            registry=reg,
        )
        self.degraded = Counter(
            G + "degraded",
            "Requests of a group sent to a smaller tier than routed, by tier and reason.",
            ["model", "tier", "reason"],
            registry=reg,
        )
        self.escalations = Counter(
            G + "escalations",
            "Small-tier answers re-run on the largest tier, by the check they failed.",
            ["model", "reason"],
            registry=reg,
        )
        self.escalation_seconds = Counter(
            G + "escalation_cost_seconds",
            "Time spent on the small-tier answers that escalation discarded.",
            ["model"],
            registry=reg,
        )
        self.escalation_tokens = Counter(
            G + "escalation_cost_tokens",
            "Tokens (usage.total_tokens) of the small-tier answers that escalation discarded.",
            ["model"],
            registry=reg,
        )
