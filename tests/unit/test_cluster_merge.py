"""The cluster's one scrape: replicas' expositions merged family by family, each sample labelled."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tailserve.cluster.metrics import merge


def exposition(requests: int, ttft: float) -> bytes:
    reg = CollectorRegistry()
    Counter("tailserve:requests", "Requests.", ["model"], registry=reg).labels("m").inc(requests)
    Histogram("tailserve:ttft_seconds", "TTFT.", ["model"], registry=reg).labels("m").observe(ttft)
    return generate_latest(reg)


def test_merge_labels_every_sample_and_keeps_families_whole() -> None:
    text = merge([("a", exposition(2, 0.01)), ("b", exposition(5, 0.3))]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # (the text format writes each `_created` as a gauge of its own, as prometheus_client always does)
    assert {n for n in families if not n.endswith("_created")} == {
        "tailserve:requests",
        "tailserve:ttft_seconds",
    }
    totals = {
        s.labels["replica"]: s.value
        for s in families["tailserve:requests"].samples
        if s.name.endswith("_total")
    }
    assert totals == {"a": 2.0, "b": 5.0}
    counts = {
        s.labels["replica"]: s.value
        for s in families["tailserve:ttft_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"a": 1.0, "b": 1.0}
    # One HELP/TYPE per family, however many replicas reported it.
    assert text.count("# TYPE tailserve:ttft_seconds histogram") == 1
