"""Observability against live servers: metric values under scripted load, the span tree, traceparent,
the request log, and the bench's server-side TTFT against its client-side one."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tailserve.bench.prom import parse
from tailserve.cli import main as tailserve_main
from tailserve.config import EngineConfig, ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.engine.engine import LLMEngine
from tailserve.obs.observer import REQUEST_LOG
from tailserve.server.app import build_app
from tests.e2e.conftest import API_KEY, MODEL, LiveServer, wait_ready

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {API_KEY}"}
P = "tailserve:"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
T = TypeVar("T")


@pytest.fixture(scope="module")
def traced(server: LiveServer) -> Iterator[LiveServer]:
    """A second server on the session's model weights: one running slot (so requests queue), a queue of
    two, tracing into memory, prompts in the request log."""
    base = server.engine
    assert base is not None
    config = EngineConfig(model=MODEL, max_num_seqs=1, kv_cache_memory=0.1)
    engine = AsyncEngine(LLMEngine(config, base.engine.model, base.tokenizer))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app(engine, ServerConfig(max_queue=2, log_prompts=True), MODEL, tracer_provider=provider)
    app.state.spans = exporter
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, timeout=30)
        yield LiveServer(url, engine=engine, app=app)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


@pytest.fixture
def request_log() -> Iterator[list[dict]]:
    """The JSON lines the request log writes while the test runs."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    handler = Collect()
    level = REQUEST_LOG.level
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        REQUEST_LOG.removeHandler(handler)
        REQUEST_LOG.setLevel(level)


def wait_idle(live: LiveServer, timeout: float = 30.0) -> None:
    assert live.engine is not None
    end = time.monotonic() + timeout
    while live.in_flight or live.engine.engine.requests:
        assert time.monotonic() < end, "the server did not go idle"
        time.sleep(0.01)


def scrape(live: LiveServer) -> Samples:
    resp = httpx.get(live.url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a series over the labels not given."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == P + name and want <= set(lab))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def completion(
    live: LiveServer, prompt: str, max_tokens: int, stream: bool = False, headers: dict | None = None
) -> dict:
    """A completion (streamed or not); returns its usage and X-Request-ID."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    with httpx.stream(
        "POST", live.base_url + "/completions", json=body, headers={**AUTH, **(headers or {})}, timeout=120
    ) as resp:
        assert resp.status_code == 200, resp.read()
        if not stream:
            return {"usage": json.loads(resp.read())["usage"], "id": resp.headers["x-request-id"]}
        usage = None
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return {"usage": usage, "id": resp.headers["x-request-id"]}


def test_metric_values_follow_the_requests_sent(server: LiveServer) -> None:
    wait_idle(server)
    before = scrape(server)
    usages = [
        completion(server, f"Count to {i}: one, two,", max_tokens=4 + i, stream=i % 2 == 1)["usage"]
        for i in range(4)
    ]
    after = scrape(server)
    prompt = sum(u["prompt_tokens"] for u in usages)
    out = sum(u["completion_tokens"] for u in usages)
    assert delta(before, after, "request_success_total") == 4
    assert delta(before, after, "request_success_total", finished_reason="length") == 4
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_time_per_output_token_seconds",
    ):
        assert delta(before, after, hist + "_count", model=MODEL, prompt_len_bucket="<128") == 4, hist
    assert delta(before, after, "inter_token_latency_seconds_count") == out - 4
    assert delta(before, after, "prompt_tokens_total") == prompt
    assert delta(before, after, "generation_tokens_total") == out
    assert delta(before, after, "step_batch_size_count") >= max(u["completion_tokens"] for u in usages)
    assert delta(before, after, "step_time_seconds_sum") > 0
    assert total(after, "num_requests_running") == 0 and total(after, "num_requests_waiting") == 0
    assert 0 <= total(after, "kv_cache_usage_perc") <= 1


def test_rejections_are_counted_by_reason(server: LiveServer) -> None:
    before = scrape(server)
    url = server.base_url + "/completions"
    good = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert httpx.post(url, json={**good, "temperature": -1}, headers=AUTH).status_code == 400
    assert httpx.post(url, json={**good, "model": "nope"}, headers=AUTH).status_code == 404
    assert httpx.post(url, json=good, headers={"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(server)
    assert delta(before, after, "requests_rejected_total", reason="invalid") == 2
    assert delta(before, after, "requests_rejected_total", reason="unauthorized") == 1
    assert delta(before, after, "requests_rejected_total") == 3


def test_a_shared_prefix_raises_the_hit_counter(server: LiveServer) -> None:
    prompt = f"{uuid.uuid4()} " + "The quick brown fox jumps over the lazy dog. " * 12
    s0 = scrape(server)
    completion(server, prompt, max_tokens=1)
    s1 = scrape(server)
    completion(server, prompt, max_tokens=1)
    s2 = scrape(server)
    assert delta(s0, s1, "prefix_cache_hits_total") == 0  # a prompt never seen: nothing to reuse
    assert delta(s0, s1, "prefix_cache_queries_total") > 0
    assert delta(s1, s2, "prefix_cache_hits_total") >= 64  # the same prompt again: its full blocks


def test_a_forced_queue_shows_in_queue_time_the_waiting_gauge_and_queue_full(traced: LiveServer) -> None:
    """One running slot and three requests: two wait behind the first; a fourth finds the queue full."""
    wait_idle(traced)
    before = scrape(traced)
    waiting_seen = 0.0

    async def main() -> None:
        nonlocal waiting_seen
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}
            url = traced.base_url + "/completions"
            runs = [asyncio.create_task(client.post(url, json=body, headers=AUTH)) for _ in range(3)]
            while traced.in_flight < 3:
                await asyncio.sleep(0.005)
            shed = await client.post(url, json=body, headers=AUTH)
            assert shed.status_code == 429 and shed.json()["error"]["code"] == "queue_full"
            while not all(r.done() for r in runs):
                text = (await client.get(traced.url + "/metrics")).text
                waiting_seen = max(waiting_seen, total(parse(text), "num_requests_waiting"))
                await asyncio.sleep(0.02)
            assert [r.result().status_code for r in runs] == [200] * 3

    asyncio.run(main())
    after = scrape(traced)
    assert waiting_seen >= 1
    assert delta(before, after, "requests_rejected_total", reason="queue_full") == 1
    assert delta(before, after, "request_queue_time_seconds_count") == 3
    # The two that waited, waited for a whole 16-token request at least: well past 10 ms.
    assert delta(before, after, "request_queue_time_seconds_bucket", le="0.01") <= 1
    decode = delta(before, after, "request_decode_time_seconds_sum") / 3
    assert delta(before, after, "request_queue_time_seconds_sum") > decode


def observed(live: LiveServer, find: Callable[[], list[T]], timeout: float = 5.0) -> list[T]:
    """What `find` returns once the observer has processed the request: a stream's record is queued when
    the server finishes sending it, which can be just after the client has read its last event."""
    assert live.app is not None
    end = time.monotonic() + timeout
    while True:
        live.app.state.server.obs.flush()
        found = find()
        if found or time.monotonic() > end:
            return found
        time.sleep(0.01)


def spans(live: LiveServer) -> list[ReadableSpan]:
    assert live.app is not None
    return list(live.app.state.spans.get_finished_spans())


def test_span_tree_continues_the_callers_trace(traced: LiveServer, request_log: list[dict]) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    rid = f"traced-{uuid.uuid4().hex[:8]}"
    headers = {"traceparent": f"00-{trace_id}-{parent}-01", "X-Request-ID": rid}
    prompt = "The capital of France is"
    usage = completion(traced, prompt, max_tokens=6, stream=True, headers=headers)["usage"]
    tree = observed(traced, lambda: [s for s in spans(traced) if f"{s.context.trace_id:032x}" == trace_id])
    (root,) = [s for s in tree if s.name == "POST /v1/completions"]
    assert root.parent is not None and f"{root.parent.span_id:016x}" == parent
    children = {s.name: s for s in tree if s is not root}
    assert set(children) == {"preprocess", "queue", "prefill", "decode", "detokenize", "network"}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in children.values())
    order = [children[n] for n in ("preprocess", "queue", "prefill", "decode", "detokenize", "network")]
    assert all(a.end_time == b.start_time for a, b in itertools.pairwise(order))  # they tile the request
    assert order[0].start_time == root.start_time and order[-1].end_time == root.end_time
    a = root.attributes
    assert a is not None
    assert a["tailserve.request_id"] == rid
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert a["tailserve.cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["http.response.status_code"] == 200
    (line,) = observed(traced, lambda: [x for x in request_log if x["request_id"] == rid])
    assert line["trace_id"] == trace_id and line["prompt"] == prompt  # --log-prompts
    assert line["ttft_s"] * 1e9 == pytest.approx(
        order[0].end_time - order[0].start_time + sum(s.end_time - s.start_time for s in order[1:3]), rel=1e-3
    )


def test_without_traceparent_a_new_trace_begins(traced: LiveServer) -> None:
    rid = completion(traced, "Hello", max_tokens=2)["id"]
    roots = observed(
        traced, lambda: [s for s in spans(traced) if (s.attributes or {}).get("tailserve.request_id") == rid]
    )
    assert len(roots) == 1 and roots[0].parent is None


def test_request_log_line_without_prompt(server: LiveServer, request_log: list[dict]) -> None:
    rid = completion(server, "Tell me a secret:", max_tokens=3, headers={"X-Request-ID": "log-1"})["id"]
    (line,) = observed(server, lambda: [x for x in request_log if x["request_id"] == rid])
    assert "prompt" not in line and "trace_id" not in line  # no --log-prompts, no tracing here
    assert line["status"] == 200 and line["finish_reason"] == "length" and line["output_tokens"] == 3
    parts = ("preprocess_s", "queue_s", "prefill_s", "decode_s", "detokenize_s", "network_s")
    assert all(line[k] is not None and line[k] >= 0 for k in parts)
    assert line["e2e_s"] <= sum(line[k] for k in parts) + 1e-5


def test_metrics_off_means_no_route_no_hook_no_thread(server: LiveServer) -> None:
    assert server.engine is not None
    hooks = list(server.engine.step_hooks)
    app = build_app(server.engine, ServerConfig(metrics=False, request_log=False), MODEL)
    obs = app.state.server.obs
    assert obs.metrics is None and obs.tracing is None and not obs.records and obs._thread is None
    assert server.engine.step_hooks == hooks
    assert all(getattr(r, "path", None) != "/metrics" for r in app.routes)


def agree(server_s: float, client_s: float) -> bool:
    """Within 10%, or 5 ms where TTFTs are too small for 10% to cover a localhost round trip."""
    return abs(server_s - client_s) <= max(0.10 * client_s, 0.005)


def test_bench_server_ttft_agrees_with_the_client(
    server: LiveServer, tmp_path: Path, request_log: list[dict]
) -> None:
    wait_idle(server)
    argv = ["bench", "--url", server.url, "--api-key", API_KEY, "--workload", "chat", "--requests", "8"]
    argv += ["--concurrency", "2", "--output-tokens", "8", "--warmup", "1", "--quiet", "--no-plots"]
    assert tailserve_main([*argv, "--out", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert run["summary"]["counts"]["ok"] == 8
    sv = run["server"]
    assert sv is not None and sv["ttft_count"] == 8
    assert agree(sv["ttft_mean_s"], sv["client_ttft_mean_s"]), sv  # what the bench itself checks
    # Request by request: the server's TTFT from its request log (the warm-up's, the first, left out)
    # against the client's. The client's clock starts before the server's and stops after it, by a
    # localhost round trip plus HTTP and SSE work on the same 2 cores.
    lines = sorted(
        observed(server, lambda: request_log if len(request_log) >= 9 else []), key=lambda x: x["time"]
    )
    assert len(lines) == 9
    server_ttft = {x["request_id"]: x["ttft_s"] for x in lines[1:]}
    gaps = [r["ttft_s"] - server_ttft[f"tailserve-bench-{r['id']}"] for r in run["requests"]]
    assert min(gaps) > -0.001, gaps
    assert statistics.median(gaps) < 0.015, gaps
