"""examples/alerts.yml: valid Prometheus rules (promtool, when installed) that name only metrics and
labels the server and the gateway really export (always: checked against real scrapes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tailserve.gateway.metrics import GatewayMetrics
from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.model

RULES = Path(__file__).resolve().parents[2] / "examples" / "alerts.yml"
METRIC = re.compile(r"tailserve:[a-z_]+")
MATCHER = re.compile(r"(tailserve:[a-z_]+)\{([^}]*)\}")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(text: str) -> dict[str, set[str]]:
    """Every series name a scrape can hold → its label names (families, even those with no sample yet)."""
    names: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        labels = {k for s in fam.samples for k in s.labels}
        for suffix in SUFFIXES.get(fam.type, ("",)):
            names[fam.name + suffix] = labels
    return names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_name_only_exported_metrics(server: LiveServer) -> None:
    httpx.post(  # one request, so every labelled series of the server exists
        server.base_url + "/completions",
        json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2},
        headers={"Authorization": "Bearer test-key"},
        timeout=60,
    )
    series = exported(httpx.get(server.url + "/metrics").text) | exported(
        GatewayMetrics(list).render().decode()
    )
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 6 and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    for rule in rules:
        names = METRIC.findall(rule["expr"])
        assert names, rule["alert"]
        for name in names:
            assert name in series, f"{rule['alert']}: {name} is not exported"
        for name, matchers in MATCHER.findall(rule["expr"]):
            for label in re.findall(r"(\w+)\s*=~?", matchers):
                assert label in series[name] or not series[name], f"{rule['alert']}: {name} has no {label}"
        for label in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            for name in names:
                missing = {x.strip() for x in label.split(",")} - series[name]
                assert not missing or not series[name], f"{rule['alert']}: {name} lacks {missing}"
    wanted = ("TTFT", "QueueWait", "PrefixCache", "Speculative", "KVCache", "5xx")
    assert all(any(w in r["alert"] for r in rules) for w in wanted)
