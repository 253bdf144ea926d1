"""Metrics, traces and the request log, fed with hand-made time stamps (no model, no server)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tailserve.bench.prom import parse, server_view
from tailserve.engine.engine import EngineStats
from tailserve.engine.outputs import RequestOutput, RequestTimes
from tailserve.obs.metrics import Metrics, prompt_len_bucket, reject_reason
from tailserve.obs.observer import RequestRecord, breakdown, log_lines, phases
from tailserve.obs.tracing import Tracing

P = "tailserve:"


@dataclass
class FakeEngine:
    """Stands in for both the AsyncEngine (scrape-time stats) and the LLMEngine the step hook gets."""

    stats: EngineStats = field(default_factory=EngineStats)


def times(arrival: float = 100.0, n_tokens: int = 3) -> RequestTimes:
    """Arrival, +1 ms admitted, +10 ms scheduled, +100 ms first token, tokens 20 ms apart, +1 ms finish."""
    t = RequestTimes(arrival=arrival, admitted=arrival + 0.001, first_scheduled=arrival + 0.011)
    t.token_times = [arrival + 0.111 + 0.02 * k for k in range(n_tokens)]
    t.first_token, t.last_token = t.token_times[0], t.token_times[-1]
    t.finished = t.last_token + 0.001
    return t


def finished(t: RequestTimes, prompt: int = 600, reason: str = "length", out: int = 3) -> RequestOutput:
    return RequestOutput(
        "r", [1], "x", finished=True, finish_reason=reason, num_prompt_tokens=prompt,
        num_cached_tokens=32, num_output_tokens=out, times=t,
    )  # fmt: skip


def scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse(m.render().decode())


def value(samples: dict, name: str, **labels: str) -> float:
    key = (P + name, tuple(sorted({"model": "m", **labels}.items())))
    return samples[key]


@pytest.mark.parametrize(
    ("tokens", "bucket"),
    [(1, "<128"), (127, "<128"), (128, "128-512"), (511, "128-512"), (512, "512-2k"), (2047, "512-2k"),
     (2048, "2k-8k"), (8191, "2k-8k"), (8192, ">=8k"), (100_000, ">=8k")],
)  # fmt: skip
def test_prompt_len_bucket_edges(tokens: int, bucket: str) -> None:
    assert prompt_len_bucket(tokens) == bucket


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [(429, "queue_full", "queue_full"), (429, "queue_wait_exceeded", "overloaded"),
     (429, "deadline_unmeetable", "deadline"), (504, "deadline_exceeded", "deadline"),
     (400, "invalid_value", "invalid"), (400, "context_length_exceeded", "invalid"),
     (404, "model_not_found", "invalid"), (413, "request_too_large", "invalid"),
     (401, "invalid_api_key", "unauthorized"), (503, "draining", "draining"), (503, "not_ready", "not_ready"),
     (500, "engine_error", "error"), (500, None, "error")],
)  # fmt: skip
def test_reject_reasons(status: int, code: str | None, reason: str) -> None:
    assert reject_reason(status, code) == reason


def test_finished_request_observed_from_its_request_times() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    t = times()
    running = RequestOutput("r2", [5], "y", times=times())  # not finished: not observed
    failed = finished(RequestTimes(arrival=1.0, finished=1.5), prompt=10, reason="error", out=0)
    m.on_step(eng, [finished(t), running, failed])  # type: ignore[arg-type]
    labels = {"model": "m", "finished_reason": "length"}
    assert m.registry.get_sample_value(P + "request_success_total", labels) == 0  # the hook observes nothing
    s = scrape(m)  # the scrape observes what the hook queued
    b = {"prompt_len_bucket": "512-2k"}
    assert value(s, "request_success_total", finished_reason="length") == 1
    assert value(s, "request_success_total", finished_reason="error") == 1
    assert value(s, "request_success_total", finished_reason="stop") == 0
    assert value(s, "prompt_tokens_total") == 600  # the failed request was never prefilled
    assert value(s, "generation_tokens_total") == 3
    for name, expect in (
        ("time_to_first_token_seconds", t.ttft),
        ("request_queue_time_seconds", t.queue_time),
        ("request_prefill_time_seconds", t.prefill_time),
        ("request_decode_time_seconds", t.decode_time),
        ("request_time_per_output_token_seconds", t.time_per_output_token),
    ):
        assert value(s, name + "_count", **b) == 1, name
        assert value(s, name + "_sum", **b) == pytest.approx(expect), name
    assert value(s, "inter_token_latency_seconds_count", **b) == 2  # every gap, token-weighted
    assert value(s, "inter_token_latency_seconds_sum", **b) == pytest.approx(0.04)
    assert value(s, "e2e_request_latency_seconds_count", **b) == 1
    assert value(s, "e2e_request_latency_seconds_count", prompt_len_bucket="<128") == 1  # the failed one
    assert (P + "time_to_first_token_seconds_count", (("model", "m"), ("prompt_len_bucket", "<128"))) not in s
    # 100 ms + 11 ms TTFT falls in the (0.1, 0.15] bucket
    assert value(s, "time_to_first_token_seconds_bucket", le="0.1", **b) == 0
    assert value(s, "time_to_first_token_seconds_bucket", le="0.15", **b) == 1


def test_step_histograms_count_steps_not_snapshots() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    eng.stats = EngineStats(last_step_time=0.012, last_batch_size=4, last_batch_tokens=100, num_steps=1)
    m.on_step(eng, [])  # type: ignore[arg-type]
    m.on_step(eng, [])  # type: ignore[arg-type]  # the same snapshot: no new step
    eng.stats = replace(eng.stats, num_running=3)  # a snapshot after an abort keeps the step's figures
    m.on_step(eng, [])  # type: ignore[arg-type]
    eng.stats = EngineStats(last_step_time=0.020, last_batch_size=8, last_batch_tokens=8, num_steps=2)
    m.on_step(eng, [])  # type: ignore[arg-type]
    s = scrape(m)
    assert value(s, "step_batch_size_count") == 2
    assert value(s, "step_batch_size_sum") == 12
    assert value(s, "step_batch_tokens_sum") == 108
    assert value(s, "step_time_seconds_sum") == pytest.approx(0.032)


def test_gauges_and_cache_counters_are_read_at_scrape_time() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    eng.stats = EngineStats(
        num_running=3, num_waiting=2, kv_cache_usage=0.25, prefix_cache_queries=100, prefix_cache_hits=40
    )
    s = scrape(m)
    assert value(s, "num_requests_running") == 3
    assert value(s, "num_requests_waiting") == 2
    assert value(s, "kv_cache_usage_perc") == 0.25
    assert value(s, "prefix_cache_queries_total") == 100
    assert value(s, "prefix_cache_hits_total") == 40
    assert value(s, "spec_decode_num_draft_tokens_total", proposer="off") == 0
    assert value(s, "spec_decode_num_accepted_tokens_total", proposer="off") == 0


def test_cpu_tier_is_a_label() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    assert value(scrape(m), "cpu_tier_info", tier="none") == 1
    eng.stats = EngineStats(cpu_tier="avx2")
    assert value(scrape(m), "cpu_tier_info", tier="avx2") == 1


@pytest.mark.parametrize("kind", ["torch", "fused-avx2"])
def test_engine_reports_the_tier_its_step_runs_at(kind: str) -> None:
    from tailserve.layers import kernels
    from tests.tiny import tiny_engine, tiny_model_of

    if kind != "torch" and ("avx2" not in kernels.runnable_tiers() or kernels.ops("avx2") is None):
        pytest.skip("this CPU cannot run the avx2 tier, or no compiler")
    assert tiny_engine(tiny_model_of(kind)).stats.cpu_tier == ("none" if kind == "torch" else "avx2")


def test_speculation_metrics_by_proposer() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    eng.stats = EngineStats(
        spec_proposer="ngram",
        spec_decode_num_draft_tokens=40,
        spec_decode_num_accepted_tokens=30,
        spec_decode_num_verify_steps=10,
    )
    s = scrape(m)
    assert value(s, "spec_decode_num_draft_tokens_total", proposer="ngram") == 40
    assert value(s, "spec_decode_num_accepted_tokens_total", proposer="ngram") == 30
    assert value(s, "spec_decode_num_verify_steps_total", proposer="ngram") == 10
    assert value(s, "spec_decode_acceptance_rate", proposer="ngram") == 0.75
    assert value(s, "spec_decode_mean_accepted_length", proposer="ngram") == 4.0


def test_the_bench_reads_these_names() -> None:
    """`tailserve bench` matches metric names by suffix: its server view must find ours."""
    eng = FakeEngine()
    m = Metrics("m", eng)
    before = scrape(m)
    eng.stats = EngineStats(prefix_cache_queries=100, prefix_cache_hits=25)
    m.on_step(eng, [finished(times(arrival=float(k))) for k in range(4)])  # type: ignore[arg-type]
    m.reject(429, "queue_full")
    view = server_view(before, scrape(m), client_ttft_mean=0.111)
    assert view["metric_prefixes"] == [P]
    assert view["ttft_count"] == 4 and view["e2e_count"] == 4 and view["itl_count"] == 8
    assert view["ttft_mean_s"] == pytest.approx(0.111)
    assert 0.1 < view["ttft_p50_s"] < 0.15
    assert view["ttft_disagrees"] is False
    assert view["prefix_cache_hit_rate"] == 0.25
    assert view["spec_decode_acceptance_rate"] is None  # no drafts: no rate, not a fake one
    assert view["counters"]['tailserve:requests_rejected_total{model="m",reason="queue_full"}'] == 1


def test_stages_tile_the_request() -> None:
    t = times()
    responded = t.finished + 0.002  # type: ignore[operator]
    b = breakdown(finished(t), responded)
    assert b["ttft_s"] == t.ttft and b["queue_s"] == t.queue_time and b["e2e_s"] == t.e2e
    parts = ("preprocess_s", "queue_s", "prefill_s", "decode_s", "detokenize_s", "network_s")
    assert math.fsum(b[k] for k in parts) == pytest.approx(responded - t.arrival)  # type: ignore[misc]
    assert b["ttft_s"] == pytest.approx(b["preprocess_s"] + b["queue_s"] + b["prefill_s"])  # type: ignore[operator]
    names = [p[0] for p in phases(t, "abort", responded)]
    assert "detokenize" not in names  # an aborted request's last gap is the wait for the abort


def test_log_line_has_the_breakdown_and_no_prompt_unless_asked() -> None:
    t = times()
    rec = RequestRecord("req-1", "/v1/completions", t.arrival, outputs=[finished(t)], responded=t.finished)
    (line,) = log_lines(rec, "m", 1.7e9, None)
    json.dumps(line)
    assert line["request_id"] == "req-1" and line["status"] == 200 and line["finish_reason"] == "length"
    assert line["prompt_tokens"] == 600 and line["cached_tokens"] == 32 and line["output_tokens"] == 3
    assert line["prompt_len_bucket"] == "512-2k"
    assert line["ttft_s"] == round(t.ttft, 6)  # type: ignore[arg-type]
    assert "prompt" not in line and "trace_id" not in line
    rec.prompt = "secret prompt"
    assert log_lines(rec, "m", 1.7e9, "ab" * 16)[0]["prompt"] == "secret prompt"
    rejected = RequestRecord("req-2", "/v1/completions", 1.0, status=429, error="queue_full", responded=1.0)
    (line,) = log_lines(rejected, "m", 1.7e9, None)
    assert line["status"] == 429 and line["error"] == "queue_full" and "ttft_s" not in line


def test_span_tree_from_time_stamps() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, "m")
    t = times()
    trace_id, parent_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    rec = RequestRecord(
        "req-1",
        "/v1/chat/completions",
        t.arrival,
        parent=Tracing.parent({"traceparent": f"00-{trace_id}-{parent_span}-01"}),
        outputs=[finished(t)],
        responded=t.finished + 0.002,  # type: ignore[operator]
    )
    assert tracing.emit(rec, lambda s: round(s * 1e9)) == trace_id
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans.pop("POST /v1/chat/completions")
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == parent_span  # the caller's span is our parent
    assert set(spans) == {"preprocess", "queue", "prefill", "decode", "detokenize", "network"}
    for s in spans.values():
        assert s.parent.span_id == root.context.span_id
    assert (spans["queue"].end_time - spans["queue"].start_time) / 1e9 == pytest.approx(t.queue_time)
    assert spans["preprocess"].start_time == root.start_time and spans["network"].end_time == root.end_time
    a = root.attributes
    assert a["tailserve.request_id"] == "req-1"
    assert a["gen_ai.usage.input_tokens"] == 600 and a["gen_ai.usage.output_tokens"] == 3
    assert a["tailserve.cached_tokens"] == 32 and a["gen_ai.response.finish_reasons"] == ("length",)
    exporter.clear()
    rec.parent = Tracing.parent({"traceparent": f"00-{trace_id}-{parent_span}-00"})  # caller: not sampled
    assert tracing.emit(rec, lambda s: round(s * 1e9)) is None
    assert not exporter.get_finished_spans()


def test_the_dashboard_queries_only_metrics_we_export() -> None:
    eng = FakeEngine()
    m = Metrics("m", eng)
    eng.stats = EngineStats(last_step_time=0.01, last_batch_size=1, last_batch_tokens=1, num_steps=1)
    m.on_step(eng, [finished(times())])  # type: ignore[arg-type]
    exported = {name for name, _ in scrape(m)}
    dashboard = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"tailserve:[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
