"""The DAG under a budget: overruns answered by their policy, the deadline held whatever the stages
do, independent stages concurrent (max, not sum)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tailserve.pipeline import (
    Budget,
    Degrade,
    Pipeline,
    Skip,
    Stage,
    StageContext,
    TTLCache,
    UseCached,
    UseDefault,
)
from tailserve.pipeline.report import aggregate, request_report

MARGIN_S = 0.05  # how far past the deadline a run may end: event-loop scheduling, not stage work


def sleeper(seconds: float, value: object = "done"):
    async def run(ctx: StageContext) -> object:
        await asyncio.sleep(seconds)
        return value

    return run


def run(stages: list[Stage], budget_s: float, **inputs: object):
    return asyncio.run(Pipeline(stages).run(Budget(budget_s), inputs))


def test_an_over_budget_stage_is_cancelled_and_its_policy_applied() -> None:
    cancelled = []

    async def slow(ctx: StageContext) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(ctx.name)
            raise
        return "late"

    stages = [
        Stage("skip", slow, cap_s=0.05, on_overrun=Skip()),
        Stage("default", slow, cap_s=0.05, on_overrun=UseDefault("fallback")),
        Stage("degrade", slow, cap_s=0.05, on_overrun=Degrade(sleeper(0.01, "small"), grace_s=0.2)),
        Stage("degrade_fails", slow, cap_s=0.05, on_overrun=Degrade(slow, 0.05, then=UseDefault("d"))),
        Stage("answer", sleeper(0), after=("skip", "default", "degrade", "degrade_fails")),
    ]
    t0 = time.perf_counter()
    results, rec = run(stages, 2.0)
    assert time.perf_counter() - t0 < 0.5
    assert results["skip"] is None and results["default"] == "fallback"
    assert results["degrade"] == "small" and results["degrade_fails"] == "d"
    assert sorted(cancelled) == ["default", "degrade", "degrade_fails", "degrade_fails", "skip"]
    outcome = {s.name: (s.outcome, s.overrun, s.error) for s in rec.stages}
    assert outcome["skip"] == ("skipped", True, "timeout")
    assert outcome["default"] == ("default", True, "timeout")
    assert outcome["degrade"] == ("degraded", True, "timeout")
    assert outcome["answer"] == ("ok", False, None)
    assert rec.degraded


def test_a_cached_policy_answers_with_the_last_good_value() -> None:
    cache = TTLCache("profile", 10, 60)
    delay = {"s": 0.0}

    async def profile(ctx: StageContext) -> dict:
        await asyncio.sleep(delay["s"])
        return {"user": ctx.inputs["user"], "tier": "gold"}

    policy = UseCached(cache, key=lambda inputs: inputs["user"], default={"tier": "unknown"})
    stages = [Stage("profile", profile, cap_s=0.1, on_overrun=policy)]
    assert run(stages, 1.0, user="u1")[0]["profile"]["tier"] == "gold"
    delay["s"] = 5.0
    results, rec = run(stages, 1.0, user="u1")
    assert results["profile"]["tier"] == "gold" and rec.stages[0].outcome == "cached"
    results, rec = run(stages, 1.0, user="u2")  # nothing cached for u2
    assert results["profile"] == {"tier": "unknown"} and rec.stages[0].outcome == "default"


def test_a_failing_stage_is_answered_by_its_policy() -> None:
    async def boom(ctx: StageContext) -> None:
        raise RuntimeError("backend down")

    results, rec = run([Stage("x", boom, on_overrun=UseDefault(0))], 1.0)
    assert results["x"] == 0
    s = rec.stages[0]
    assert s.outcome == "default" and not s.overrun and "backend down" in (s.error or "")


def test_the_deadline_holds_whatever_the_stages_do() -> None:
    async def hog(ctx: StageContext) -> None:
        await asyncio.sleep(10)

    async def spin_past(ctx: StageContext) -> str:
        # ignores its own allowance and asks for far more than is left: the runner still stops it
        await asyncio.sleep(ctx.budget.total_s * 3)
        return "late"

    for budget_s in (0.1, 0.3):
        stages = [
            Stage("a", hog, weight=1),
            Stage("b", spin_past, weight=5, on_overrun=Degrade(hog, grace_s=10)),
            Stage("c", hog, after=("a", "b"), on_overrun=UseDefault("c")),
            Stage("d", spin_past, after=("c",), min_s=0.0),
        ]
        t0 = time.perf_counter()
        results, rec = run(stages, budget_s)
        wall = time.perf_counter() - t0
        assert wall <= budget_s + MARGIN_S, (budget_s, wall)
        assert rec.e2e_s <= budget_s + MARGIN_S
        assert results["d"] is None


def test_a_stage_below_its_minimum_does_not_start() -> None:
    started = []

    async def answer(ctx: StageContext) -> str:
        started.append(1)
        return "x"

    stages = [
        Stage("slow", sleeper(0.2), weight=1),
        Stage("answer", answer, after=("slow",), min_s=0.2, on_overrun=UseDefault("sorry")),
    ]
    results, rec = run(stages, 0.3)
    assert results["answer"] == "sorry" and not started
    assert next(s.error for s in rec.stages if s.name == "answer") == "no_time"


def test_independent_stages_take_the_maximum_not_the_sum() -> None:
    stages = [Stage(f"s{i}", sleeper(0.15)) for i in range(4)]
    stages.append(Stage("answer", sleeper(0), after=tuple(s.name for s in stages)))
    t0 = time.perf_counter()
    _, rec = run(stages, 2.0)
    wall = time.perf_counter() - t0
    assert 0.15 <= wall < 0.15 * 2, wall  # the sum would be 0.6 s
    assert all(s.outcome == "ok" for s in rec.stages)


def test_where_the_time_went() -> None:
    stages = [
        Stage("retrieve", sleeper(0.02), cap_s=0.5),
        Stage("tools", sleeper(0.2), cap_s=0.05, on_overrun=Skip()),
        Stage("answer", sleeper(0.03), after=("retrieve", "tools")),
    ]
    recs = [run(stages, 1.0)[1] for _ in range(3)]
    one = request_report(recs[0])
    assert [r["stage"] for r in one["stages"]][-1] == "answer"
    assert one["degraded"] and one["e2e_ms"] > 0
    tools = next(r for r in one["stages"] if r["stage"] == "tools")
    assert tools["allowance_ms"] == 50.0 and tools["outcome"] == "skipped"
    agg = aggregate(recs)
    by = {r["stage"]: r for r in agg["stages"]}
    assert agg["requests"] == 3 and agg["degraded_share"] == 1.0
    assert by["tools"]["overruns"] == 3 and by["retrieve"]["overruns"] == 0
    assert by["retrieve"]["p50_ms"] >= 20 and by["answer"]["p99_ms"] >= 30
    assert 0 < by["answer"]["share"] < 1


def test_a_span_per_stage_with_its_budget_and_time_used() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tailserve.pipeline.tracing import PipelineTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = PipelineTracing(provider)
    root = tracing.start("pipeline")
    root_id = root.get_span_context().span_id
    assert PipelineTracing.headers(root)["traceparent"].split("-")[2] == f"{root_id:016x}"
    stages = [Stage("fast", sleeper(0.01)), Stage("slow", sleeper(1), cap_s=0.05, after=("fast",))]
    _, rec = run(stages, 1.0)
    tracing.finish(root, rec)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"pipeline", "stage fast", "stage slow"}
    slow = spans["stage slow"]
    assert slow.parent.span_id == root_id  # type: ignore[union-attr]
    assert slow.attributes["tailserve.stage.budget_s"] == 0.05
    assert slow.attributes["tailserve.stage.used_s"] >= 0.05 and slow.attributes["tailserve.stage.overrun"]
    assert slow.attributes["tailserve.stage.outcome"] == "skipped"
    assert slow.attributes["error.type"] == "timeout"
    assert spans["pipeline"].attributes["tailserve.degraded"] is True
    assert (slow.end_time - slow.start_time) / 1e9 == pytest.approx(rec.stages[1].elapsed_s, abs=1e-6)


def test_learned_weights_split_by_what_the_stages_take() -> None:
    from tailserve.pipeline.dag import learn
    from tailserve.pipeline.record import RequestRecord, StageRecord

    typical: dict[str, float] = {}
    rec = RequestRecord(
        1.0, 0.0, 1.0, [StageRecord("a", 1, 0, 0.2, "ok", False), StageRecord("b", 1, 0, 0.5, "ok", False)]
    )
    learn(typical, rec, 0.5)
    rec.stages[0] = StageRecord("a", 1, 0, 0.4, "skipped", True, "timeout")
    rec.stages.append(StageRecord("c", 0, 0, 0, "skipped", True, "no_time"))  # never ran: not learned
    learn(typical, rec, 0.5)
    assert typical == pytest.approx({"a": 0.3, "b": 0.5})

    stages = [
        Stage("tools", sleeper(0.01), weight=1),
        Stage("answer", sleeper(0.03), weight=1, after=("tools",)),
    ]
    p = Pipeline(stages, learn_rate=0.5)
    assert p.current_weights() == ({"tools": 1, "answer": 1}, {"tools": 2, "answer": 1})  # the prior
    _, first = asyncio.run(p.run(Budget(2.0)))
    assert first.stages[0].allowance_s == pytest.approx(1.0, abs=0.02)  # half, by the configured weights
    _, second = asyncio.run(p.run(Budget(2.0)))
    tools, answer = p.typical["tools"], p.typical["answer"]
    assert answer > tools
    # now the answer, which takes longer, keeps the larger share
    assert second.stages[0].allowance_s < 1.0
