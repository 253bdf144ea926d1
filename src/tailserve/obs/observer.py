"""The server's observer: metrics, traces and the per-request JSON log, all kept off the hot path.

The event loop only fills a `RequestRecord` per HTTP request and queues it when the response ends; the
engine thread only queues finished outputs (`Metrics.on_step`). One daemon thread turns both into
histogram observations, spans and log lines a few times a second. With tracing and the request log
off, no record is made at all.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from tailserve.obs.metrics import Metrics, prompt_len_bucket

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.requests import Request

    from tailserve.config import ServerConfig
    from tailserve.engine.async_engine import AsyncEngine
    from tailserve.engine.outputs import RequestOutput, RequestTimes
    from tailserve.obs.tracing import Tracing

log = logging.getLogger("tailserve.obs")
REQUEST_LOG = logging.getLogger("tailserve.requests")
FLUSH_INTERVAL = 0.2  # seconds between the observer thread's passes


@dataclass
class RequestRecord:
    """One HTTP request as the server answered it: filled on the event loop, read on the observer thread."""

    request_id: str
    route: str
    arrival: float  # perf_counter, the same stamp as the engine's RequestTimes.arrival
    parent: Context | None = None  # the caller's trace context, when tracing
    prompt: Any = None  # the request's messages or prompt, only with --log-prompts
    outputs: list[RequestOutput | None] = field(default_factory=list)  # each choice's latest delta
    status: int = 200
    error: str | None = None  # the error code answered
    responded: float | None = None  # when the response's last byte went to the server


def phases(
    times: RequestTimes, finish_reason: str | None, responded: float | None
) -> list[tuple[str, float | None, float | None]]:
    """An engine request's stages as (name, start, end) stamps, end to end from arrival to the response's
    last byte. `detokenize` is the final step's post-sample work (detokenizing, stop checks); it is left
    out when the request was aborted, since then that gap is the wait for the abort."""
    stages: list[tuple[str, float | None, float | None]] = [
        ("preprocess", times.arrival, times.admitted),
        ("queue", times.admitted or times.arrival, times.first_scheduled),
        ("prefill", times.first_scheduled, times.first_token),
        ("decode", times.first_token, times.last_token),
    ]
    if finish_reason in ("stop", "length"):
        stages.append(("detokenize", times.last_token, times.finished))
    stages.append(("network", times.finished, responded))
    return stages


def breakdown(out: RequestOutput, responded: float | None) -> dict[str, float | None]:
    """The latency figures of one engine request, in seconds: RequestTimes' own, plus the stages it has
    no property for (preprocess, detokenize, network)."""
    t = out.times
    if t is None:
        return {}
    extra = {
        name: end - start
        for name, start, end in phases(t, out.finish_reason, responded)
        if start is not None and end is not None
    }
    return {
        "ttft_s": t.ttft,
        "tpot_s": t.time_per_output_token,
        "e2e_s": t.e2e,
        "preprocess_s": extra.get("preprocess"),
        "queue_s": t.queue_time,
        "prefill_s": t.prefill_time,
        "decode_s": t.decode_time,
        "detokenize_s": extra.get("detokenize"),
        "network_s": extra.get("network"),
    }


def log_lines(rec: RequestRecord, model: str, wall: float, trace_id: str | None) -> list[dict[str, Any]]:
    """One log entry per choice (one when the request got no engine request); `wall` is epoch seconds."""
    base: dict[str, Any] = {
        "event": "request",
        "time": round(wall, 3),
        "request_id": rec.request_id,
        "route": rec.route,
        "model": model,
        "status": rec.status,
    }
    if rec.error is not None:
        base["error"] = rec.error
    if trace_id is not None:
        base["trace_id"] = trace_id
    if rec.prompt is not None:
        base["prompt"] = rec.prompt
    lines = []
    for i, out in enumerate(rec.outputs):
        if out is None:
            continue
        line = {
            **base,
            "choice": i,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.num_prompt_tokens,
            "cached_tokens": out.num_cached_tokens,
            "output_tokens": out.num_output_tokens,
            "prompt_len_bucket": prompt_len_bucket(out.num_prompt_tokens),
        }
        for key, value in breakdown(out, rec.responded).items():
            line[key] = None if value is None else round(value, 6)
        lines.append(line)
    return lines or [base]


def log_requests_to_stderr(stream: TextIO | None = None) -> None:
    """Send the request log to stderr (or `stream`) as bare JSON lines, apart from the server's own log
    format."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    REQUEST_LOG.propagate = False


class Observer:
    """Everything a server observes. `metrics` and `tracing` are None when off."""

    def __init__(
        self,
        config: ServerConfig,
        model: str,
        engine: AsyncEngine,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.model = model
        self.log_prompts = config.log_prompts
        self.request_log = config.request_log
        self.metrics = Metrics(model, engine) if config.metrics else None
        if self.metrics is not None:
            engine.step_hooks.append(self.metrics.on_step)
            engine.overflow_hooks.append(self.metrics.slow_reader_aborts.labels(model).inc)
        self.tracing: Tracing | None = None
        if tracer_provider is not None or config.otel_exporter:
            from tailserve.obs.tracing import Tracing, make_tracer_provider

            provider = tracer_provider or make_tracer_provider(str(config.otel_exporter))
            self.tracing = Tracing(provider, model)
        self.records = self.tracing is not None or self.request_log  # whether requests make records
        self._pending: deque[RequestRecord] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.records or self.metrics is not None:
            self._thread = threading.Thread(target=self._run, name="tailserve-obs", daemon=True)
            self._thread.start()

    # --- the event loop's side: cheap ------------------------------------------------------------

    def start(self, request: Request, request_id: str, arrival: float) -> RequestRecord | None:
        """A record for a new HTTP request, or None when neither tracing nor the request log is on."""
        if not self.records:
            return None
        parent = self.tracing.parent(request.headers) if self.tracing is not None else None
        return RequestRecord(request_id, request.scope["path"], arrival, parent)

    def rejected(self, record: RequestRecord | None, status: int, code: str | None) -> None:
        """The request is answered with an error status: count it, and note it on its record."""
        if self.metrics is not None:
            self.metrics.reject(status, code)
        if record is not None:
            record.status, record.error = status, code or str(status)

    def submit(self, record: RequestRecord) -> None:
        """The response has ended: queue the record for its spans and log line."""
        record.responded = time.perf_counter()
        self._pending.append(record)

    # --- the observer thread's side ----------------------------------------------------------------

    def flush(self) -> None:
        """Observe what is queued: metrics, then each record's spans and log lines."""
        if self.metrics is not None:
            self.metrics.flush()
        with self._lock:
            if not self._pending:
                return
            offset = time.time_ns() - time.perf_counter_ns()

            def ns(t: float) -> int:
                return offset + round(t * 1e9)

            logging_on = self.request_log and REQUEST_LOG.isEnabledFor(logging.INFO)
            while self._pending:
                rec = self._pending.popleft()
                trace_id = self.tracing.emit(rec, ns) if self.tracing is not None else None
                if logging_on:
                    wall = ns(rec.responded or rec.arrival) / 1e9
                    for line in log_lines(rec, self.model, wall, trace_id):
                        REQUEST_LOG.info(json.dumps(line, separators=(",", ":"), default=str))

    def close(self) -> None:
        """Stop the thread after a last pass, and push out spans still batched."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        if self.tracing is not None:
            self.tracing.provider.force_flush()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except Exception:  # a bad record must not end observation
                log.exception("observer pass failed")
