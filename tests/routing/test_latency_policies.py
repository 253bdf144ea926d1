"""Hedging, the tier router, escalation checks and degrade: the pure rules, driven by explicit data."""

from __future__ import annotations

import time

import pytest

from tailserve.routing.degrade import PrefillMeter, TtftSignal, degrade, predicted_ttft, tier_ttft
from tailserve.routing.hedging import HedgeBudget, HedgePolicy, TtftWindow, hedge_delay, may_hedge_onto
from tailserve.routing.tiers import FeatureRouter, escalation_reason, features


def test_hedge_delay_is_the_set_value_or_the_observed_quantile() -> None:
    window = TtftWindow()
    assert hedge_delay(HedgePolicy(delay=0.3), None) == 0.3
    policy = HedgePolicy(min_samples=20)
    for i in range(19):
        window.add(0.01 * (i + 1))
    assert hedge_delay(policy, window) is None  # too few samples to trust a p95
    window.add(0.2)
    assert hedge_delay(policy, window) == pytest.approx(0.19)  # nearest-rank p95 of 0.01 … 0.2
    for _ in range(500):
        window.add(1.0)
    assert len(window) == window.size and hedge_delay(policy, window) == 1.0


def test_hedge_budget_caps_the_share_and_recovers_with_the_window() -> None:
    budget = HedgeBudget(ratio=0.05, window=10.0)
    granted = 0
    for i in range(200):  # a spike: every request late, every one asks for a hedge
        budget.on_request(i * 0.01)
        granted += budget.try_hedge(i * 0.01)
    assert granted == 10  # 5 % of 200, never more
    assert not budget.try_hedge(2.0)
    budget.on_request(20.0)  # the window has passed: the old hedges no longer count, nor the requests
    assert not budget.try_hedge(20.0)  # one request does not buy a hedge at 5 %
    for _ in range(19):
        budget.on_request(20.0)
    assert budget.try_hedge(20.0)


def test_no_hedge_onto_a_loaded_backend() -> None:
    policy = HedgePolicy(max_load=4)
    assert may_hedge_onto(policy, 3.5)
    assert not may_hedge_onto(policy, 4.0)


def test_hedge_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="quantile"):
        HedgePolicy(quantile=1.0)
    with pytest.raises(ValueError, match="max_share"):
        HedgePolicy(max_share=2.0)


def msgs(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return out


ROUTER_TABLE = [
    # (body, hint, expected tier, why)
    ({"messages": msgs("What is the capital of France?")}, None, "small", "short chat"),
    ({"prompt": "Once upon a time"}, None, "small", "short completion"),
    ({"messages": msgs("Summarise: " + "word " * 600)}, None, "large", "long prompt"),
    ({"messages": msgs("Fix this:\n```python\nprint(1\n```")}, None, "large", "code fence"),
    ({"messages": msgs("def f(x):\n    return x\nwhy does it fail?")}, None, "large", "code line"),
    ({"messages": msgs("Prove that the sum of two even numbers is even.")}, None, "large", "math word"),
    ({"messages": msgs(r"Simplify $\frac{a}{b}$")}, None, "large", "latex"),
    (
        {"messages": msgs("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
        None,
        "large",
        "tools",
    ),
    ({"messages": msgs("a", "b", "c", "d", "e", "f", "g")}, None, "small", "4 turns alone: 0.5"),
    ({"messages": msgs("Prove it", system="be brief")}, "small", "small", "hint wins"),
    ({"messages": msgs("hello")}, "large", "large", "hint wins"),
    ({"messages": msgs("hello")}, "medium", "small", "unknown hint is ignored"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x^2 + 1 = 0, solve for x"}]}]},
        None,
        "large",
        "content parts",
    ),
]


@pytest.mark.parametrize(("body", "hint", "tier", "why"), ROUTER_TABLE, ids=[r[3] for r in ROUTER_TABLE])
def test_feature_router_table(body: dict, hint: str | None, tier: str, why: str) -> None:
    assert FeatureRouter().route(body, hint, ["small", "large"]).tier == tier, why


def test_feature_router_three_tiers_and_thresholds() -> None:
    router = FeatureRouter()
    hard = {"messages": msgs("Prove this:\n```\ndef f(): pass\n```")}  # code + math: score 2
    assert router.route(hard, None, ["s", "m", "l"]).tier == "l"
    assert router.route({"messages": msgs("Prove it")}, None, ["s", "m", "l"]).tier == "m"
    assert FeatureRouter(thresholds=[2.5]).route(hard, None, ["s", "l"]).tier == "s"
    f = features({"messages": msgs("a", "b", "c"), "tools": []})
    assert (f.user_turns, f.tools, f.code, f.math) == (2, False, False, False)


def test_feature_router_is_fast() -> None:
    router = FeatureRouter()
    bodies = [b for b, *_ in ROUTER_TABLE] * 50
    times = []
    for body in bodies:
        start = time.perf_counter()
        router.route(body, None, ["small", "large"])
        times.append(time.perf_counter() - start)
    times.sort()
    assert times[len(times) // 2] < 1e-3  # the median; the p99 is measured in the benchmark


def answer(content: str | None, finish: str = "stop", tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


ALL = ["empty", "length", "invalid_json"]
JSON = {"response_format": {"type": "json_object"}}


@pytest.mark.parametrize(
    ("body", "ans", "checks", "reason"),
    [
        ({}, answer("fine"), ALL, None),
        ({}, answer("  "), ALL, "empty"),
        ({}, answer(None, tool_calls=[{"id": "c"}]), ALL, None),  # a tool call is an answer
        ({}, answer("cut o", "length"), ALL, "length"),
        ({}, answer("cut o", "length"), ["empty"], None),  # only the configured checks
        (JSON, answer('{"a": 1}'), ALL, None),
        (JSON, answer('{"a": '), ALL, "invalid_json"),
        ({}, answer('{"a": '), ALL, None),  # no schema asked: not JSON is fine
        ({}, {"choices": []}, ALL, "empty"),
        ({}, {"choices": [{"text": "completion", "finish_reason": "stop"}]}, ALL, None),
    ],
)
def test_escalation_reason(body: dict, ans: dict, checks: list[str], reason: str | None) -> None:
    assert escalation_reason(body, ans, checks) == reason


def test_predicted_ttft_takes_the_larger_of_published_and_own_queue() -> None:
    assert predicted_ttft(TtftSignal(published_ttft=0.7, prefill_rate=1000.0), 100) == 0.7
    # a burst sent since the backend last published: the idle figure it published must not win
    burst = TtftSignal(published_ttft=0.2, queued_tokens=2900, prefill_rate=1000.0)
    assert predicted_ttft(burst, 100) == pytest.approx(3.0)
    assert predicted_ttft(TtftSignal(published_ttft=0.2), 100) == 0.2
    assert predicted_ttft(TtftSignal(queued_tokens=900, prefill_rate=1000.0), 100) == 1.0
    assert predicted_ttft(TtftSignal(), 100) is None
    assert tier_ttft([TtftSignal(available=False)], 10) == float("inf")
    fast, slow = TtftSignal(prefill_rate=1000.0), TtftSignal(queued_tokens=5000, prefill_rate=1000.0)
    assert tier_ttft([slow, fast, TtftSignal(available=False)], 100) == pytest.approx(0.1)
    assert tier_ttft([slow, TtftSignal()], 100) is None  # one backend unmeasured: unknown


def test_degrade_walks_the_order() -> None:
    order = ["large", "medium", "small"]
    assert degrade("large", order, {"large": 0.5, "small": 0.1}, slo=1.0).reason is None
    assert degrade("large", order, {"large": 2.0, "medium": 1.5, "small": 0.1}, 1.0).tier == "small"
    c = degrade("large", order, {"large": 2.0, "medium": 0.5, "small": 0.1}, 1.0)
    assert (c.tier, c.reason) == ("medium", "ttft_slo")
    assert degrade("large", order, {"large": float("inf"), "medium": None}, 1.0).reason == "unavailable"
    c = degrade("large", order, {"large": 2.0, "medium": 3.0, "small": 4.0}, 1.0)
    assert (c.tier, c.reason, c.late) == ("large", None, 2.0)  # nothing is faster: stay, late
    c = degrade("large", order, {"large": 2.0, "medium": 3.0, "small": 1.5}, 1.0)
    assert (c.tier, c.reason, c.late) == ("small", "ttft_slo", 1.5)  # the fastest, still late
    assert degrade("large", order, {"large": 2.0, "medium": 0.5}, 1.0).late is None  # medium meets it
    assert degrade("small", order, {"small": 9.0}, 1.0).tier == "small"  # the last has nowhere to go
    assert degrade("large", ["small", "large"], {"large": 9.0}, 1.0).tier == "large"  # order says so
    assert degrade("large", order, {"large": None}, 1.0).reason is None  # unknown: no evidence


def test_degrade_switches_when_the_queue_passes_the_threshold_and_back_when_it_drains() -> None:
    meter, slo, prompt = PrefillMeter(), 0.45, 100.0
    meter.first_token(meter.sent(prompt), 0.1)  # warm: 100 tokens in 0.1 s → 1000 tokens/s
    meter.done(prompt)

    def tier() -> str:
        predicted = {"large": tier_ttft([meter.signal(True, None)], prompt), "small": 0.05}
        return degrade("large", ["large", "small"], predicted, slo).tier

    assert tier() == "large"
    for _ in range(3):
        meter.sent(prompt)
    assert tier() == "large"  # (300 + 100) / 1000 = 0.4 s
    meter.sent(prompt)
    assert tier() == "small"  # (400 + 100) / 1000 = 0.5 s > 0.45
    meter.sent(prompt)
    assert tier() == "small"
    for _ in range(5):
        meter.done(prompt)
    assert meter.queued_tokens == 0 and tier() == "large"


def test_prefill_meter_separates_overhead_from_rate() -> None:
    meter = PrefillMeter()
    for ahead in (10, 100, 400, 50, 800, 200):  # TTFT = 0.2 s + ahead / 1000 tokens/s
        meter.first_token(ahead, 0.2 + ahead / 1000)
    overhead, rate = meter.fit()  # type: ignore[misc]
    assert overhead == pytest.approx(0.2, abs=1e-6) and rate == pytest.approx(1000, rel=1e-6)
    assert predicted_ttft(meter.signal(True, None), 100) == pytest.approx(0.3)
    one = PrefillMeter()
    one.first_token(100, 0.5)  # one size only: all of it on the tokens
    assert one.fit() == (0.0, 200.0)
