"""Each rule of the attempt loop, against fake backends."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import uvloop

from tailserve.gateway.attempts import _sleep_until
from tests.gateway.conftest import Fake, chat, dead_url, fakes, gateway


def one_model(*urls: str, **extra: object) -> dict:
    return {"models": {"m": {"backends": [{"url": u} for u in urls]}}, **extra}


def test_answer_passes_through_with_request_id_and_trace_headers() -> None:
    with (
        fakes(Fake(model="upstream-name")) as (f,),
        gateway({"models": {"m": {"backends": [{"url": f.url, "model": "upstream-name"}]}}}) as gw,
    ):
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=chat(),
            headers={"X-Request-ID": "abc", "traceparent": traceparent},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hello"
        assert r.headers["x-request-id"] == "abc"
        body, headers = f.requests[0]
        assert body["model"] == "upstream-name"  # renamed for the backend
        assert "timeout" not in body  # only tailserve backends get one
        assert headers["x-request-id"] == "abc" and headers["traceparent"] == traceparent
        assert gw.metric("requests_total", backend=f.url + "/v1", status="200") == 1


def test_retries_5xx_on_another_backend() -> None:
    with fakes(Fake(mode="500"), Fake()) as (bad, good), gateway(one_model(bad.url, good.url)) as gw:
        for i in range(20):  # keys spread over both backends
            r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": f"q{i}"})
            assert r.status_code == 200, r.text
        assert len(good.requests) == 20
        assert gw.metric("retries_total") == len(bad.requests) >= 1
        assert gw.in_flight() == 0


def test_4xx_is_passed_through_and_not_retried() -> None:
    with fakes(Fake(mode="400"), Fake()) as (a, b), gateway(one_model(a.url, b.url)) as gw:
        statuses = [
            httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": f"q{i}"}) for i in range(20)
        ]
        got_400 = [r for r in statuses if r.status_code == 400]
        assert len(got_400) == len(a.requests) >= 1  # every 400 the backend gave reached the client as given
        assert got_400[0].json()["error"]["code"] == "fake_400"
        assert gw.metric("retries_total") == 0


def test_429_retry_after_cools_the_backend() -> None:
    with fakes(Fake(mode="429:30"), Fake()) as (busy, ok), gateway(one_model(busy.url, ok.url)) as gw:
        for i in range(20):  # keys spread over both backends
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        assert len(busy.requests) == 1  # after its 429, nothing more for the 30 s it asked
        assert len(ok.requests) == 20
        assert gw.metric("breaker_state") == 0  # load, not ill health


def test_short_retry_after_is_waited_for_when_nothing_else_serves() -> None:
    with fakes(Fake(script=["429:0.3"])) as (f,), gateway(one_model(f.url)) as gw:
        start = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
        assert r.status_code == 200
        assert 0.3 <= time.monotonic() - start < 1.5
        assert len(f.requests) == 2


def test_the_wait_for_a_retry_after_never_ends_early_on_uvloop() -> None:
    """uvloop's timers have millisecond grain and fire up to a millisecond early; waking before
    the backend's cool-down ends made the wait above pass the 429 on, one run in a few hundred."""
    early: list[float] = []

    async def waits() -> None:
        for i in range(60):
            wake = time.monotonic() + 0.002 + i * 1.7e-5
            await _sleep_until(wake)
            if time.monotonic() < wake:
                early.append(wake - time.monotonic())

    uvloop.run(waits())
    assert early == []


def test_long_retry_after_is_passed_on_at_once() -> None:
    with fakes(Fake(mode="429:30")) as (f,), gateway(one_model(f.url)) as gw:
        start = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
        assert time.monotonic() - start < 1.0
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert r.json()["error"]["code"] == "fake_429"


def test_nothing_can_serve_is_a_fast_structured_503_and_the_breaker_opens() -> None:
    config = one_model(dead_url(), dead_url(), breaker={"failures": 2, "open_for": 30})
    with gateway(config) as gw:
        for _ in range(4):
            start = time.monotonic()
            r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
            assert time.monotonic() - start < 1.0
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "backends_unavailable"
            assert r.json()["error"]["type"] == "service_unavailable"
            assert int(r.headers["retry-after"]) >= 1
        assert gw.metric("breaker_state") == 4  # both open (2 each)
        assert httpx.get(gw.url + "/ready").status_code == 503
        assert httpx.get(gw.url + "/health").status_code == 200


def test_breaker_half_opens_and_closes_after_probe_successes() -> None:
    f = Fake(script=["500", "500"])
    with (
        fakes(f),
        gateway(
            one_model(
                f.url,
                breaker={"failures": 2, "open_for": 0.3, "successes": 2},
                retry={"max_attempts": 1, "max_wait": 0},
            )
        ) as gw,
    ):
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 500
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 500
        assert gw.metric("breaker_state") == 2
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 503  # open: not sent
        time.sleep(0.35)
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 200  # probe
        assert gw.metric("breaker_state") == 1
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 200
        assert gw.metric("breaker_state") == 0


def test_fallback_chain_moves_to_the_next_model() -> None:
    with (
        fakes(Fake(mode="503"), Fake(model="small")) as (big, small),
        gateway(
            {
                "models": {
                    "m": {"backends": [{"url": big.url}], "fallback": ["small"]},
                    "small": {"backends": [{"url": small.url}]},
                }
            }
        ) as gw,
    ):
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
        assert r.status_code == 200
        assert small.requests[0][0]["model"] == "small"
        assert gw.metric("fallbacks_total", model="m", to="small") == 1


def test_retry_budget_bounds_retries() -> None:
    no_budget = {"budget_ratio": 0.0, "budget_min": 0}
    with (
        fakes(Fake(mode="500"), Fake(mode="500")) as fs,
        gateway(one_model(*(f.url for f in fs), retry=no_budget)) as gw,
    ):
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
        assert r.status_code == 500  # the backend's own error, passed through
        assert sum(len(f.requests) for f in fs) == 1
        assert gw.metric("retry_budget_exhausted_total") == 1


@pytest.mark.parametrize("mode", ["hang", "hang_mid"])
def test_two_second_deadline_holds_whatever_the_backends_do(mode: str) -> None:
    with fakes(Fake(mode=mode), Fake(mode=mode)) as fs, gateway(one_model(*(f.url for f in fs))) as gw:
        start = time.monotonic()
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=chat(stream=True, timeout=2.0), timeout=10
        ) as r:
            text = r.read().decode()
        elapsed = time.monotonic() - start
        assert elapsed < 2.3, elapsed
        if mode == "hang":
            assert r.status_code == 504 and json.loads(text)["error"]["code"] == "deadline_exceeded"
        else:
            assert r.status_code == 200 and "deadline_exceeded" in text and text.endswith("data: [DONE]\n\n")
        time.sleep(0.2)
        assert gw.in_flight() == 0


def test_tailserve_backends_get_the_remaining_time_as_timeout() -> None:
    with fakes(Fake(script=["500"])) as fs:  # one backend: the retry goes to it again
        config = {"models": {"m": {"backends": [{"url": f.url, "kind": "tailserve"} for f in fs]}}}
        with gateway(config) as gw:
            assert httpx.post(gw.url + "/v1/chat/completions", json=chat(timeout=5.0)).status_code == 200
        timeouts = [body["timeout"] for f in fs for body, _ in f.requests]
        assert len(timeouts) == 2 and all(0 < t <= 5.0 for t in timeouts)
        assert max(timeouts) < 5.0  # the second attempt got what was left, not the whole 5 s


def test_a_timeout_past_a_day_is_400_not_an_overflow() -> None:
    with fakes(Fake()) as (f,):
        with gateway({"models": {"m": {"backends": [{"url": f.url, "kind": "tailserve"}]}}}) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", json=chat(timeout=1e308))  # the fuzzer's case
            assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"
            assert httpx.post(gw.url + "/v1/chat/completions", json=chat(timeout=86_400)).status_code == 200
        assert len(f.requests) == 1


def test_stream_passes_chunks_through_as_they_come() -> None:
    with fakes(Fake(chunks=4, gap=0.3)) as (f,), gateway(one_model(f.url)) as gw:
        stamps, lines = [], []
        start = time.monotonic()
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat(stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    stamps.append(time.monotonic() - start)
                    lines.append(line)
        assert lines[-1] == "data: [DONE]" and len(lines) == 5
        assert stamps[0] < 0.25 and stamps[-1] > 0.85  # the first chunk did not wait for the rest


def test_upstream_dropping_mid_stream_ends_with_an_error_event() -> None:
    with fakes(Fake(mode="cut_mid"), Fake()) as (cut, other), gateway(one_model(cut.url)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat(stream=True)) as r:
            text = r.read().decode()
        assert r.status_code == 200
        assert '"t0"' in text and "upstream_error" in text and text.endswith("data: [DONE]\n\n")
        assert len(cut.requests) == 1 and not other.requests  # streamed already: never retried
        end = time.monotonic() + 2  # the lease is released as the relay closes, after the last byte
        while gw.in_flight() and time.monotonic() < end:
            time.sleep(0.02)
        assert gw.in_flight() == 0


def test_client_disconnect_closes_the_upstream() -> None:
    with fakes(Fake(chunks=100, gap=0.05)) as (f,), gateway(one_model(f.url)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat(stream=True)) as r:
            for _ in r.iter_lines():
                break
        end = time.monotonic() + 2
        while (f.closed_streams == 0 or gw.in_flight()) and time.monotonic() < end:
            time.sleep(0.02)
        assert f.closed_streams == 1 and gw.in_flight() == 0


def test_client_disconnect_before_the_answer_cancels_the_attempt() -> None:
    with fakes(Fake(mode="hang")) as (f,), gateway(one_model(f.url)) as gw:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=0.5)
        end = time.monotonic() + 2
        while gw.in_flight() and time.monotonic() < end:
            time.sleep(0.02)
        assert gw.in_flight() == 0
        assert gw.metric("attempts_total", outcome="cancelled") == 1


def test_bad_requests() -> None:
    with fakes(Fake()) as (f,), gateway(one_model(f.url, api_key="k")) as gw:
        auth = {"Authorization": "Bearer k"}
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat(model="nope"), headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(gw.url + "/v1/chat/completions", json={"messages": []}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat(timeout=-1), headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"
        r = httpx.post(gw.url + "/v1/chat/completions", content=b"{", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert not f.requests
        r = httpx.get(gw.url + "/v1/models", headers=auth)
        assert [m["id"] for m in r.json()["data"]] == ["m"]
        assert httpx.get(gw.url + "/v1/nothing").status_code == 404


def test_shared_prefix_sticks_to_one_backend() -> None:
    with fakes(Fake(), Fake()) as fs, gateway(one_model(*(f.url for f in fs))) as gw:
        for i in range(8):
            body = {
                "model": "m",
                "messages": [{"role": "system", "content": "S" * 50}, {"role": "user", "content": str(i)}],
            }
            assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        assert sorted(len(f.requests) for f in fs) == [0, 8]
        # Every choice is counted by why it was made: here, each went where the prefix was.
        assert gw.metric("route_decisions_total", model="m", reason="affinity") == 8
        assert gw.metric("route_decisions_total") == 8


def test_poller_reads_a_tailserve_backends_queue() -> None:
    with fakes(Fake(waiting=7)) as (f,):
        config = {"poll_interval": 0.05, "models": {"m": {"backends": [{"url": f.url, "kind": "tailserve"}]}}}
        with gateway(config) as gw:
            end = time.monotonic() + 2
            while gw.metric("backend_reported_waiting") != 7 and time.monotonic() < end:
                time.sleep(0.05)
            assert gw.metric("backend_reported_waiting") == 7


def test_published_ttft_steers_requests_from_answers_and_polls() -> None:
    slow, fast = Fake(load="waiting=4;ttft=3.0"), Fake(load="waiting=0;ttft=0.01")
    with fakes(slow, fast):
        # No poll: what steers is the header of each answer the gateway relays.
        with gateway(one_model(slow.url, fast.url, policy="least_loaded")) as gw:
            for _ in range(6):
                assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 200
            assert len(slow.requests) <= 1 and len(fast.requests) >= 5
        # Polling /load alone steers the very first request.
        slow.requests.clear()
        config = one_model(slow.url, fast.url, policy="least_loaded", poll_interval=0.05)
        for b in config["models"]["m"]["backends"]:
            b["kind"] = "tailserve"
        with gateway(config) as gw:
            backend = gw.gateway.pools["m"].upstreams[slow.url + "/v1"].backend
            end = time.monotonic() + 2
            while backend.reported_ttft != 3.0 and time.monotonic() < end:
                time.sleep(0.02)
            assert httpx.post(gw.url + "/v1/chat/completions", json=chat()).status_code == 200
            assert not slow.requests
