"""The bench against a fake server whose delays, token counts and failures are known."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tailserve.bench.cli import add_parser
from tailserve.bench.client import ClientConfig, RequestRecord
from tailserve.bench.prom import scrape, server_view
from tailserve.bench.runner import Load, Runner, RunResult, arrival_times
from tailserve.bench.stats import SLO, summarize
from tailserve.bench.workloads import Workload, WorkloadParams, build_workload


def _run(url: str, workload: Workload, load: Load, duration: float = 30.0, **cfg: Any) -> RunResult:
    async def go() -> RunResult:
        runner = Runner(ClientConfig(base_url=url, model="fake-model", **cfg))
        try:
            return await runner.run(workload, load, duration)
        finally:
            await runner.aclose()

    return asyncio.run(go())


def main(argv: list[str]) -> int:
    """`tailserve` with only the bench registered, as tailserve.cli.main runs it."""
    parser = argparse.ArgumentParser(prog="tailserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _rid(rec: RequestRecord) -> str:
    return f"tailserve-bench-{rec.id}"  # the X-Request-ID the client sends


def _wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def test_measured_latency_matches_injected(fake_server: Callable[..., Any]) -> None:
    ttfts = [0.02 + 0.01 * k for k in range(10)]  # known distribution: p50 0.065, p90 0.101
    srv = fake_server(ttft=ttfts, itl=0.01, tokens=20)
    wl = build_workload("chat", 20, 0, WorkloadParams(output_tokens=20))

    async def go() -> tuple[RunResult, dict]:
        runner = Runner(ClientConfig(base_url=srv.url, model="fake-model"))
        before = await scrape(srv.url)
        res = await runner.run(wl, Load("closed", 5), 30.0)
        after = await scrape(srv.url)
        await runner.aclose()
        assert before is not None and after is not None
        seen = [r.ttft for r in res.records if r.ttft is not None]
        return res, server_view(before, after, sum(seen) / len(seen))

    res, server = asyncio.run(go())
    s = summarize(res.records, res.wall_s, SLO())
    lat = s["latency"]
    assert s["counts"]["ok"] == 20 and s["tokens"]["source"] == {"usage": 20}
    # Against the injected delays, which are lower bounds: never measured below them, and above
    # by little (the slack is for a loaded 2-core machine oversleeping the fake server's sleeps)...
    assert 0.065 - 0.003 < lat["ttft_s"]["p50"] < 0.065 + 0.03
    assert 0.101 - 0.003 < lat["ttft_s"]["p90"] < 0.101 + 0.035
    assert lat["itl_s"]["n"] == 20 * 19
    assert lat["itl_s"]["p50"] == pytest.approx(0.010, abs=0.004)
    assert lat["itl_s"]["mean"] == pytest.approx(0.010, abs=0.004)
    assert lat["tpot_s"]["p50"] == pytest.approx(0.010, abs=0.004)
    assert 0.065 + 19 * 0.010 - 0.01 < lat["e2e_s"]["p50"] < 0.065 + 19 * 0.010 + 0.1
    # ...and tightly against when the server really sent each token (same clock, same process).
    lag = sorted(t - e for r in res.records for t, e in zip(r.token_times, srv.emits[_rid(r)], strict=True))
    assert lag[0] >= 0 and lag[len(lag) // 2] < 0.005
    tail = sorted(r.end - srv.emits[_rid(r)][-1] for r in res.records if r.end is not None)
    assert tail[0] >= 0 and tail[len(tail) // 2] < 0.005
    assert s["tokens"]["output"]["min"] == s["tokens"]["output"]["max"] == 20
    assert s["tokens"]["prompt"]["min"] > 400  # the shared system prompt, as the server counted it
    assert s["throughput"]["output_tok_per_s"] == pytest.approx(20 * 20 / res.wall_s)
    assert srv.connections == 20 + 2  # a fresh connection per request by default, and two scrapes
    assert server["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert server["spec_decode_acceptance_rate"] == pytest.approx(0.75)
    assert server["ttft_count"] == 20 and server["ttft_mean_s"] == pytest.approx(0.065, abs=1e-6)
    assert server["ttft_p50_s"] == pytest.approx(0.065, abs=0.011)
    assert 0 <= server["ttft_disagreement"] < 0.5  # the client's TTFT adds connect and transfer time


def test_shed_and_failed_are_counted(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(
        ttft=0.005, itl=0.002, tokens=5, statuses={1: 429, 4: 503, 6: 500}, stream_errors={8: 2}
    )
    res = _run(srv.url, build_workload("chat", 10, 0, WorkloadParams(output_tokens=5)), Load("closed", 2))
    s = summarize(res.records, res.wall_s, SLO(ttft=1.0))
    c = s["counts"]
    assert (c["sent"], c["ok"], c["shed"], c["failed"]) == (10, 6, 2, 2)
    assert s["errors_by_status"] == {"429": 1, "503": 1, "500": 1, "stream error": 1}
    assert s["goodput"]["met"] == 6 and s["goodput"]["share"] == pytest.approx(0.6)
    assert "injected 500" in next(r.error for r in res.records if r.http_status == 500)
    broken = next(r for r in res.records if r.error and r.error.startswith("stream error"))
    assert len(broken.token_times) == 2 and "mid-stream" in broken.error


def test_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = _run(url, build_workload("chat", 2, 0), Load("closed", 1))
    assert [r.status for r in res.records] == ["error", "error"]
    assert summarize(res.records, res.wall_s, SLO())["errors_by_status"] == {"ConnectionRefusedError": 2}
    assert main(["bench", "--url", url, "--quiet", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--url", "localhost:8000", "--quiet", "--model", "m"]) == 2


@pytest.mark.parametrize("keep_alive", [False, True])
def test_disconnect_really_closes(fake_server: Callable[..., Any], keep_alive: bool) -> None:
    srv = fake_server(ttft=0.01, itl=0.01)
    wl = build_workload("disconnect", 16, 0, WorkloadParams(output_tokens=30, disconnect_share=0.4))
    res = _run(srv.url, wl, Load("closed", 4), keep_alive=keep_alive)
    dropped = {r.id: r for r in res.records if r.tag == "disconnect"}
    assert dropped and all(r.status == "disconnected" for r in dropped.values())
    assert all(r.status == "ok" for r in res.records if r.tag != "disconnect")
    assert _wait_for(lambda: len(srv.disconnects) == len(dropped))  # the server saw each drop
    assert {rid for rid, _ in srv.disconnects} == {_rid(r) for r in dropped.values()}
    for r in dropped.values():
        turn = wl.sessions[r.session].turns[0]
        assert turn.disconnect_after is not None and len(r.token_times) == turn.disconnect_after < 30
    assert all(sent < 30 for _, sent in srv.disconnects)
    assert _wait_for(lambda: len(srv.completed) == 16 - len(dropped))
    if keep_alive:
        assert srv.connections < 16
    s = summarize(res.records, res.wall_s, SLO(ttft=1.0))
    assert s["counts"]["disconnected"] == len(dropped) and s["counts"]["failed"] == 0
    assert s["goodput"]["share"] == 1.0  # deliberate drops are not held against the server


def test_open_loop_arrivals(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(ttft=0.005, itl=0.002, tokens=3)
    wl = build_workload("chat", 20, 0, WorkloadParams(output_tokens=3))
    load = Load("poisson", 100.0)
    res = _run(srv.url, wl, load)
    at = arrival_times(load, 20, 0)
    lags = [r.start - res.t0 - t for r, t in zip(res.records, at, strict=True)]
    assert min(lags) > -0.001 and sorted(lags)[10] < 0.01 and max(lags) < 0.1  # on schedule, never early
    burst = _run(
        srv.url, build_workload("burst", 6, 0, WorkloadParams(output_tokens=3)), Load("burst", 3, 0.15)
    )
    starts = [r.start - burst.t0 for r in burst.records]
    first, second = starts[:3], starts[3:]
    assert min(first) >= 0.15 and min(second) >= 0.30  # idle first, never early
    assert max(first) - min(first) < 0.02 and max(second) - min(second) < 0.02  # all at once
    assert min(second) - max(first) > 0.08
    assert all(r.status == "ok" for r in res.records + burst.records)


def test_duration_cap_stops_and_cancels(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(ttft=0.01, itl=0.01, tokens=1000)  # each request would take 10 s
    t = time.monotonic()
    res = _run(srv.url, build_workload("chat", 6, 0), Load("closed", 3), duration=0.4)
    assert time.monotonic() - t < 2.0
    assert res.hit_duration_cap and [r.status for r in res.records] == ["cancelled"] * 3
    s = summarize(res.records, res.wall_s, SLO(ttft=1.0), not_sent=3)
    assert s["counts"]["cancelled"] == 3 and s["counts"]["not_sent"] == 3 and s["goodput"]["share"] == 0.0
    assert _wait_for(lambda: len(srv.disconnects) == 3)  # cancelling closed the streams
    res = _run(srv.url, build_workload("chat", 2, 0), Load("closed", 2), timeout=0.2)
    assert [r.status for r in res.records] == ["timeout"] * 2 and res.wall_s < 1.0
    assert summarize(res.records, res.wall_s, SLO())["errors_by_status"] == {"timeout": 2}
    assert _wait_for(lambda: len(srv.disconnects) == 5)


def test_multiturn_sends_growing_history(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(ttft=0.002, itl=0.001, tokens=4)
    wl = build_workload("multiturn", 9, 0, WorkloadParams(output_tokens=4))
    res = _run(srv.url, wl, Load("closed", 2))
    by_id = {r.id: r for r in res.records}
    assert len(srv.bodies) == 9
    for r in res.records:
        if r.turn == 0:
            continue
        prev = by_id[r.id - 1]
        body = next(
            b for b in srv.bodies if b["messages"][-1]["content"] == wl.sessions[r.session].turns[r.turn].user
        )
        assert len(body["messages"]) == 2 + 2 * r.turn  # system, then user/assistant pairs
        assert body["messages"][-2] == {"role": "assistant", "content": prev.text}
        assert prev.text == " w0 w1 w2 w3"
        assert r.approx_prompt_tokens > prev.approx_prompt_tokens


def test_completions_without_usage_multi_token_events_unchunked(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(ttft=0.005, itl=0.005, tokens=10, tokens_per_event=2, usage=False, chunked=False)
    wl = build_workload("copy", 4, 0, WorkloadParams(output_tokens=10))
    res = _run(srv.url, wl, Load("closed", 2), endpoint="completions", count_tokens=lambda t: len(t.split()))
    assert all(b["prompt"].endswith("Assistant:") and b["ignore_eos"] for b in srv.bodies)
    s = summarize(res.records, res.wall_s, SLO())
    assert s["tokens"]["source"] == {"tokenizer": 4} and s["tokens"]["output"]["max"] == 10
    assert s["tokens"]["multi_token_events"] == 4 and s["latency"]["itl_s"]["n"] == 4 * 4
    res = _run(srv.url, wl, Load("closed", 2), endpoint="completions", ignore_eos=False)
    assert res.records[0].output_tokens == 5 and res.records[0].token_source == "chunks"
    assert "ignore_eos" not in srv.bodies[-1]


def test_oversized_and_slowreader(fake_server: Callable[..., Any]) -> None:
    srv = fake_server(ttft=0.005, itl=0.005, tokens=10, context_len=600)
    wl = build_workload("oversized", 12, 0, WorkloadParams(output_tokens=10, context_len=600))
    res = _run(srv.url, wl, Load("closed", 3))
    s = summarize(res.records, res.wall_s, SLO())
    n_big = sum(1 for r in res.records if r.tag == "oversized")
    assert n_big and s["counts"]["rejected_as_expected"] == n_big and s["counts"]["failed"] == 0
    assert s["by_tag"]["oversized"]["status"] == {"error": n_big}
    assert s["counts"]["measured"] == 12 - n_big
    wl = build_workload("slowreader", 8, 0, WorkloadParams(output_tokens=10))
    res = _run(srv.url, wl, Load("closed", 4), read_delay=0.03)
    slow = res.records[0]
    assert slow.tag == "slowreader" and slow.status == "ok"
    s = summarize(res.records, res.wall_s, SLO())
    assert s["counts"]["measured"] == 7 and s["by_tag"]["slowreader"]["n"] == 1


def test_cli_writes_json_plots_and_compares(
    fake_server: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = fake_server(ttft=0.01, itl=0.003, tokens=6)
    common = ["bench", "--url", srv.url + "/v1", "--requests", "8", "--output-tokens", "6", "--quiet"]
    slo = ["--slo-ttft", "500ms", "--slo-tpot", "50"]
    assert main([*common, "--concurrency", "2,4", *slo, "--warmup", "2", "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert result["schema"] == "tailserve-bench/1"
    assert result["config"]["model"] == "fake-model" and result["config"]["slo"]["ttft_s"] == 0.5
    assert [r["load"] for r in result["runs"]] == [
        {"mode": "closed", "concurrency": 2.0},
        {"mode": "closed", "concurrency": 4.0},
    ]
    run = result["runs"][0]
    assert len(run["requests"]) == 8 and run["summary"]["counts"]["ok"] == 8
    assert run["server"]["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert set(run["requests"][0]) >= {"ttft_s", "itl_s", "tpot_s", "e2e_s", "output_tokens", "status"}
    assert result["capacity"]["max_load_meeting_slo"] == 4.0
    for name in ("latency_cdf.png", "load_curves.png"):
        assert (tmp_path / "a" / name).read_bytes()[:4] == b"\x89PNG"
    assert len(srv.bodies) == 2 + 16  # warm-up, then each load point
    assert main([*common, "--rate", "200", "--warmup", "0", "--no-plots", "--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "latency_cdf.png").exists()
    capsys.readouterr()
    assert (
        main(["bench", "compare", str(tmp_path / "a" / "bench.json"), str(tmp_path / "b" / "bench.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "B/A" in out and "TTFT p50" in out and re.search(r"\d\.\d\dx", out)
