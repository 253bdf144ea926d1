"""The attempt loop: one request, tried on backends and fallback models under ONE deadline.

Rules (each one tested in tests/gateway):
- the deadline is set once, on arrival (the body's `timeout`, else the configured `deadline`); every
  wait of every attempt is capped by what is left, and a tailserve backend gets what is left as the
  request's `timeout` so it sheds at once rather than answering late;
- a retry happens only before anything reached the client: on connection errors, timeouts, 5xx, 429
  and 503; a Retry-After takes that backend out of the choice for its duration; retries after the
  first attempt spend the retry budget, with full-jitter backoff between them;
- when a model's backends are all open, capped, cooling or failing, the next model of its fallback
  chain is tried; when nothing can serve, the answer comes at once: the last backend error as it was
  given, or a 503 `backends_unavailable` with Retry-After;
- a backend's 4xx is its answer: passed through with its status and body, never retried.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry.trace import Span

from tailserve.api.errors import ApiError
from tailserve.gateway.config import RetrySpec
from tailserve.gateway.h1client import Response
from tailserve.gateway.hedge import Hedger
from tailserve.gateway.metrics import GatewayMetrics
from tailserve.gateway.relay import Relay
from tailserve.gateway.tracing import GatewayTracing, end_span
from tailserve.gateway.upstream import Pool, Upstream
from tailserve.routing.affinity import PromptSize, prompt_size
from tailserve.routing.retry import RetryBudget, backoff, parse_retry_after, retryable_status

log = logging.getLogger("tailserve.gateway")

MAX_COOL = 60.0  # seconds: the longest Retry-After a backend can take itself out of the choice for
PASS_HEADERS = ("content-type", "retry-after")


@dataclass
class Call:
    """One client request as the loop needs it."""

    route: str  # "/chat/completions" or "/completions"
    raw: bytes  # the body as received
    body: dict[str, Any]  # the body parsed
    model: str  # the public model asked for
    stream: bool
    deadline: float  # time.monotonic() by which the answer must be complete
    key: str | None  # the affinity key
    headers: dict[str, str]  # to forward: X-Request-ID, trace headers
    span: Span | None = None

    @functools.cached_property
    def prompt(self) -> PromptSize:
        """Its prompt's size, and the part its affinity key stands for: what the chooser weighs."""
        return prompt_size(self.body, self.key)


@dataclass
class Answer:
    """A whole response: the backend's (passed through), or the gateway's own error."""

    status: int
    body: bytes
    headers: dict[str, str]
    backend: str  # who answered; metrics.NO_BACKEND for the gateway itself

    @classmethod
    def error(cls, err: ApiError) -> Answer:
        return cls(
            err.status,
            json.dumps(err.body()).encode(),
            {"content-type": "application/json", **err.headers},
            "none",
        )


@dataclass
class _Retry:
    answer: Answer | None  # the backend's error, when it gave one


class Attempts:
    def __init__(
        self,
        pools: dict[str, Pool],
        retry: RetrySpec,
        metrics: GatewayMetrics,
        tracing: GatewayTracing | None = None,
        rng: random.Random | None = None,
        hedger: Hedger | None = None,
    ) -> None:
        self.pools = pools
        self.retry = retry
        self.metrics = metrics
        self.tracing = tracing
        self.rng = rng or random.Random()
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_min)
        self.hedger = hedger  # observes every attempt; hedges those of models with a policy

    async def run(self, call: Call) -> Answer | Relay:
        self.budget.on_request(time.monotonic())
        chain = [call.model, *self.pools[call.model].fallback]
        last: Answer | None = None
        made, per_model, link, waited = 0, 0, 0, False
        tried: set[str] = set()
        while True:
            now = time.monotonic()
            remaining = call.deadline - now
            if remaining <= 0:
                return last or Answer.error(
                    ApiError(504, "the request ran past its deadline", code="deadline_exceeded")
                )
            pool = self.pools[chain[link]]
            backend = (
                pool.chooser.choose(call.key, now, tried, call.prompt)
                if per_model < self.retry.max_attempts
                else None
            )
            if backend is None:
                if link + 1 < len(chain):
                    self.metrics.fallbacks.labels(chain[link], chain[link + 1]).inc()
                    link, per_model, tried = link + 1, 0, set()
                    continue
                hint = min(self.pools[m].chooser.wait_hint(now) for m in chain)
                if not waited and 0 < hint <= min(self.retry.max_wait, remaining):
                    waited = True  # once: a short Retry-After is worth waiting for, a long one is not
                    await _sleep_until(now + hint)
                    link, per_model, tried = 0, 0, set()
                    continue
                return last or self._unavailable(call.model, hint)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("route %s", pool.chooser.explain(call.key, backend, now))
            if made:
                if not self.budget.try_retry(now):
                    self.metrics.budget_exhausted.labels(call.model).inc()
                    return last or self._unavailable(call.model, 1.0)
                self.metrics.retries.labels(call.model).inc()
            made += 1
            per_model += 1
            tried.add(backend.name)
            result = await self._observed(pool, pool.upstreams[backend.name], call, remaining, made, tried)
            if not isinstance(result, _Retry):
                return result
            last = result.answer or last
            delay = backoff(made, self.retry.backoff_base, self.retry.backoff_cap, self.rng)
            await asyncio.sleep(min(delay, max(0.0, call.deadline - time.monotonic())))

    async def _observed(
        self, pool: Pool, up: Upstream, call: Call, remaining: float, made: int, tried: set[str]
    ) -> Answer | Relay | _Retry:
        if self.hedger is None:
            return await self._attempt(up, pool.name, call, remaining, made)

        def run_one(u: Upstream, number: int, hedge: bool) -> Any:
            return self._attempt(u, pool.name, call, call.deadline - time.monotonic(), number, hedge)

        return await self.hedger.attempt(run_one, pool, up, call, made, tried, _failed)

    def _unavailable(self, model: str, hint: float) -> Answer:
        return Answer.error(
            ApiError(
                503,
                f"no backend can serve {model!r} now: all are down, overloaded or failing; retry later",
                code="backends_unavailable",
                headers={"Retry-After": str(max(1, math.ceil(hint)))},
            )
        )

    def _payload(self, up: Upstream, call: Call, remaining: float) -> bytes:
        """The body for this backend: its name for the model, and for tailserve the time left."""
        changes: dict[str, Any] = {}
        if call.body.get("model") != up.model:
            changes["model"] = up.model
        if up.kind == "tailserve":
            changes["timeout"] = max(0.001, math.floor(remaining * 1000) / 1000)
        if not changes:
            return call.raw
        if up.kind == "tailserve":
            spliced = _append_keys(call.raw, changes)
            if spliced is not None:
                return spliced
        return json.dumps({**call.body, **changes}, ensure_ascii=False, separators=(",", ":")).encode()

    async def _attempt(
        self, up: Upstream, model: str, call: Call, remaining: float, number: int, hedge: bool = False
    ) -> Answer | Relay | _Retry:
        start = time.monotonic()
        lease = up.backend.acquire(start)
        span = None
        if self.tracing is not None and call.span is not None:
            span = self.tracing.attempt_span(call.span, model, up.name, number, hedge)
        outcome, label, status = "failure", "connect_error", None
        response: Response | None = None
        committed = False
        try:
            headers = {**call.headers, "content-type": "application/json"}
            if up.api_key:
                headers["authorization"] = f"Bearer {up.api_key}"
            if span is not None:
                GatewayTracing.inject(span, headers)
            request = up.client.build_request(
                "POST",
                up.base + call.route,
                content=self._payload(up, call, remaining),
                headers=headers,
                timeout=up.timeout(remaining),
            )
            label = "connect_error"
            response = await up.client.send(request, stream=True)
            up.observe(response.headers, time.monotonic())
            status = response.status_code
            label = "timeout"
            if status >= 400:
                data = await response.aread()
                answer = Answer(status, data, _passed(response), up.name)
                if not retryable_status(status):
                    outcome, label = "success", "http_error"  # the backend works; the request is at fault
                    return answer
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if retry_after:
                    up.backend.cool(time.monotonic(), min(retry_after, MAX_COOL))
                # 429 is load, not ill health: it cools the backend but does not count toward the breaker.
                outcome, label = ("neutral" if status == 429 else "failure"), "retryable"
                return _Retry(answer)
            chunks = response.aiter_raw()
            first = await chunks.__anext__()
            self.metrics.ttft.labels(model, up.name).observe(time.monotonic() - start)
            if call.stream:
                committed = True
                return Relay(model, up, response, lease, first, chunks, call.deadline, self.metrics, span)
            rest = [first]
            async for chunk in chunks:
                rest.append(chunk)
            outcome, label = "success", "ok"
            return Answer(status, b"".join(rest), _passed(response), up.name)
        except StopAsyncIteration:
            label = "empty_body"
            return _Retry(None)
        except httpx.TimeoutException as e:
            label = "connect_error" if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout) else "timeout"
            return _Retry(None)
        except httpx.HTTPError as e:
            label = "connect_error" if isinstance(e, httpx.ConnectError) else "upstream_error"
            return _Retry(None)
        except BaseException:  # cancelled: the client left, or the server is stopping
            outcome, label = "neutral", "cancelled"
            raise
        finally:
            if not committed:
                if response is not None:
                    await response.aclose()
                lease.release(time.monotonic(), outcome)
                self.metrics.attempts.labels(model, up.name, label).inc()
                if span is not None:
                    span.set_attribute("tailserve.outcome", label)
                end_span(span, status, None if outcome != "failure" else label)


def _append_keys(raw: bytes, changes: dict[str, Any]) -> bytes | None:
    """`raw` (a JSON object's bytes) with `changes` appended before its closing brace, or None where
    it is not plain UTF-8 ending in `}`. A tailserve backend's parser (Python's json) keeps a key's
    last value, so an appended key overrides the client's; this spares re-serializing the whole body
    (messages and all) on the request's critical path, which cost more than the routing decision."""
    body = raw.rstrip()
    if not body.endswith(b"}") or b"\x00" in raw[:4]:  # UTF-16/32 JSON has a zero in its first 4 bytes
        return None
    extra = json.dumps(changes, ensure_ascii=False, separators=(",", ":")).encode()
    return body[:-1] + b"," + extra[1:]


def _failed(result: object) -> bool:
    return isinstance(result, _Retry)


def _passed(response: Response) -> dict[str, str]:
    return {h: response.headers[h] for h in PASS_HEADERS if h in response.headers}


async def _sleep_until(wake: float) -> None:
    """Sleep until `time.monotonic()` reaches `wake`: uvloop's millisecond timers can fire early, and
    a backend still cooling for a few hundred microseconds would turn the wait into a failure."""
    while (left := wake - time.monotonic()) > 0:
        await asyncio.sleep(left)
