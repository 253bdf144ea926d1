"""Hedging, tier groups (router, escalation) and degrade through a live gateway, against fake backends
with controlled first-token latency."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.gateway.conftest import Fake, fakes, gateway

# No messages: no affinity key, so the least loaded backend by weight (the slow one, weight 2) is first.
KEYLESS = {"model": "m", "messages": [], "stream": True}


def hedged(slow: Fake, fast: Fake, **hedge: Any) -> dict:
    backends = [{"url": slow.url, "weight": 2}, {"url": fast.url}]
    return {"models": {"m": {"backends": backends, "hedge": hedge}}}


def stream(url: str, body: dict) -> float:
    """Seconds until the stream's first data line; the stream is read to its end."""
    start, first = time.monotonic(), None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.monotonic() - start
    assert first is not None
    return first


def wait_for(check: Any, seconds: float = 3.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_hedge_fires_only_past_the_delay_and_cancels_the_loser() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        fakes(Fake(), Fake()) as (slow, fast),
        gateway(hedged(slow, fast, delay=0.3, max_share=1.0), provider) as gw,
    ):
        for _ in range(2):
            stream(gw.url, KEYLESS)  # answers well within the delay: no hedge
        assert gw.metric("hedges_total", event="sent") == 0 and not fast.requests
        slow.first_delay = 3.0
        ttft = stream(gw.url, KEYLESS)
        assert 0.3 <= ttft < 2.0  # the hedge's first token, not the stalled one's
        assert len(slow.requests) == 3 and len(fast.requests) == 1
        wait_for(lambda: slow.closed_streams == 1)  # the loser's connection was closed
        assert gw.metric("hedges_total", event="sent") == 1
        assert gw.metric("hedges_total", event="won") == 1
        assert gw.metric("hedges_total", event="cancelled") == 1
        assert gw.metric("attempts_total", outcome="cancelled") == 1
        wait_for(lambda: gw.in_flight() == 0)
    attempts = [s for s in exporter.get_finished_spans() if s.name == "attempt"][-2:]
    by_hedge = {bool(s.attributes.get("tailserve.hedge")): s for s in attempts}
    assert by_hedge[False].attributes["tailserve.outcome"] == "cancelled"
    assert by_hedge[True].attributes["tailserve.backend"] == fast.url + "/v1"
    assert by_hedge[True].parent == by_hedge[False].parent  # both children of the request's span


def test_hedges_stay_within_the_cap_under_a_spike() -> None:
    with (
        fakes(Fake(first_delay=0.6), Fake()) as (slow, fast),
        gateway(hedged(slow, fast, delay=0.1, max_share=0.2, max_load=100)) as gw,
    ):

        async def spike() -> None:
            async with httpx.AsyncClient(timeout=10) as client:

                async def one() -> None:
                    async with client.stream("POST", gw.url + "/v1/chat/completions", json=KEYLESS) as r:
                        async for _ in r.aiter_lines():
                            pass

                await asyncio.gather(*(one() for _ in range(30)))

        asyncio.run(spike())
        sent = gw.metric("hedges_total", event="sent")
        assert 1 <= sent <= 0.2 * 30  # every slow request was late; the budget let a fifth hedge
        assert gw.metric("hedges_total", event="cancelled") == sent  # one of each pair closed
        assert gw.metric("hedges_total", event="won") >= 1  # hedges onto the fast backend win
        wait_for(lambda: gw.in_flight() == 0)


def group(small: Fake, large: Fake, **extra: Any) -> dict:
    return {
        "models": {
            "s": {"backends": [{"url": small.url}]},
            "l": {"backends": [{"url": large.url}]},
            "m": {"group": {"tiers": {"small": "s", "large": "l"}, **extra}},
        }
    }


def ask(url: str, text: str, **extra: Any) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10)


def test_router_and_escalation_rerun_only_the_failing_class() -> None:
    answers = {"empty": ("", "stop"), "cut": ("hel", "length"), "bad json": ("{oops", "stop")}
    answers["good json"] = ('{"a": 1}', "stop")
    json_format = {"response_format": {"type": "json_object"}}
    with (
        fakes(Fake(model="s", answers=answers), Fake(model="l")) as (small, large),
        gateway(group(small, large, escalate=["empty", "length", "invalid_json"])) as gw,
    ):
        assert "m" in [c["id"] for c in httpx.get(gw.url + "/v1/models").json()["data"]]
        cases = [  # (text, extra body, tier that answers, escalated because)
            ("hi", {}, "small", None),
            ("```python\nprint(1)\n```", {}, "large", None),  # routed large: never on small
            ("empty", {}, "large", "empty"),
            ("cut", {}, "large", "length"),
            ("bad json", json_format, "large", "invalid_json"),
            ("bad json", {}, "small", None),  # no JSON asked: not a failure
            ("good json", json_format, "small", None),
        ]
        for text, extra, tier, reason in cases:
            r = ask(gw.url, text, **extra)
            assert r.status_code == 200, r.text
            assert r.headers["x-tailserve-tier"] == tier, text
            assert r.headers.get("x-tailserve-escalated") == reason, text
            assert "x-tailserve-degraded" not in r.headers
        hint = ask(gw.url, "hi", stream=False)
        assert hint.headers["x-tailserve-tier"] == "small"
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Tailserve-Tier": "large"},
        )
        assert r.headers["x-tailserve-tier"] == "large"
        to_large = [b["messages"][-1]["content"] for b, _ in large.requests]
        assert sorted(to_large) == sorted(["```python\nprint(1)\n```", "empty", "cut", "bad json", "hi"])
        assert all(b["model"] == "l" for b, _ in large.requests)
        for reason in ("empty", "length", "invalid_json"):
            assert gw.metric("escalations_total", reason=reason) == 1
        assert gw.metric("escalation_cost_seconds_total") > 0
        assert gw.metric("router_seconds_count") == len(cases) + 2
        assert gw.metric("tier_requests_total", tier="small") == 4


def test_degrade_switches_tiers_when_the_large_queue_passes_the_slo_and_back() -> None:
    prompt = "x" * 400  # 100 tokens by the gateway's estimate
    chat = {"messages": [{"role": "user", "content": prompt}]}
    with (
        fakes(Fake(model="s"), Fake(model="l", first_delay=0.1)) as (small, large),
        gateway(group(small, large, degrade={"ttft_slo": 1.0, "order": ["large", "small"]})) as gw,
    ):
        hint = {"X-Tailserve-Tier": "large"}
        body = {"model": "m", **chat, "stream": True}
        for _ in range(2):  # measured: 100 tokens in 0.1 s and the overhead: at most 1000 tokens/s
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=hint) as r:
                assert r.headers["x-tailserve-tier"] == "large"
                r.read()
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **chat}, headers=hint)
        assert r.headers["x-tailserve-tier"] == "large" and "tailserve" not in r.json()

        large.first_delay = 1.5

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=10) as client:

                async def one() -> None:  # straight to the large tier's model: its queue, not the group's
                    direct = {**body, "model": "l"}
                    async with client.stream("POST", gw.url + "/v1/chat/completions", json=direct) as resp:
                        await resp.aread()

                tasks = [asyncio.create_task(one()) for _ in range(16)]  # 1600 tokens: ≥ 1.7 s at ≤ 1000/s
                await asyncio.sleep(0.5)  # queued on the large tier, none has a first token yet
                probe = await client.post(
                    gw.url + "/v1/chat/completions", json={"model": "m", **chat}, headers=hint
                )
                assert probe.headers["x-tailserve-tier"] == "small"
                assert probe.headers["x-tailserve-degraded"] == "ttft_slo"
                assert probe.json()["tailserve"] == {
                    "tier": "small",
                    "routed_tier": "large",
                    "degraded": "ttft_slo",
                }
                await asyncio.gather(*tasks)

        asyncio.run(burst())
        large.first_delay = 0.1
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **chat}, headers=hint)
        assert r.headers["x-tailserve-tier"] == "large"  # drained: back on the large tier
        assert "x-tailserve-degraded" not in r.headers
        assert gw.metric("degraded_total", tier="small", reason="ttft_slo") == 1
        assert len(small.requests) == 1
        assert json.loads(json.dumps(small.requests[0][0]))["model"] == "s"


def test_degrade_shed_answers_503_at_once_when_no_tier_can_meet_the_slo() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 400}]}  # 100 tokens by the estimate
    shed = {"ttft_slo": 5.0, "order": ["large", "small"], "shed": True}
    with (
        fakes(Fake(model="s", first_delay=0.3), Fake(model="l", first_delay=0.3)) as (small, large),
        gateway(group(small, large, degrade=shed)) as gw,
    ):
        body = {"model": "m", **chat, "stream": True}
        for tier in ("large", "small", "large", "small"):  # each tier measured: ~0.3 s per 100 tokens
            with httpx.stream(
                "POST", gw.url + "/v1/chat/completions", json=body, headers={"X-Tailserve-Tier": tier}
            ) as r:
                r.read()
        hint = {"X-Tailserve-Tier": "large"}
        assert ask(gw.url, chat["messages"][0]["content"]).status_code == 200  # within 5 s: served
        start = time.monotonic()
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "m", **chat},
            headers={**hint, "X-Tailserve-TTFT-SLO": "0.05"},  # no tier predicts 50 ms
        )
        assert time.monotonic() - start < 0.25  # answered at once, not after a 0.3 s first token
        assert r.status_code == 503 and r.json()["error"]["code"] == "slo_unreachable"
        assert r.headers["x-tailserve-degraded"] == "shed" and int(r.headers["retry-after"]) >= 1
        assert gw.metric("degraded_total", reason="shed") == 1
