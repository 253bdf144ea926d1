"""One Prometheus scrape for the whole cluster: every replica's exposition, each sample labelled with
its `replica`, merged family by family (a family's samples must sit together in the text format), and
the ingress's own counters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "tailserve_cluster_"


class _Families:
    """A collector that yields fixed metric families (the merged ones)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: Iterable[tuple[str, bytes]]) -> bytes:
    """(replica name, exposition text) pairs as one exposition, every sample labelled `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in texts:
        for fam in text_string_to_metric_families(text.decode("utf-8")):
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                into.samples.append(s._replace(labels={**s.labels, "replica": replica}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


class IngressMetrics:
    """What only the ingress sees: re-sends, its own refusals, replicas routed to, failed scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.resent = Counter(
            PREFIX + "resent",
            "Requests sent again because their replica died before answering.",
            registry=reg,
        )
        self.rejected = Counter(
            PREFIX + "rejected",
            "Requests the ingress refused or ended itself, by reason.",
            ["reason"],
            registry=reg,
        )
        self.replicas = Gauge(PREFIX + "replicas", "Replicas the ingress routes to.", registry=reg)
        self.scrape_errors = Counter(
            PREFIX + "scrape_errors", "Replica metrics scrapes that failed or timed out.", registry=reg
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
