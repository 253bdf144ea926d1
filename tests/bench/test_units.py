"""The pure parts of the bench: workloads, percentiles, goodput, capacity, /metrics parsing, flags."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pytest

from tailserve.bench.cli import _seconds, add_parser
from tailserve.bench.client import RequestRecord
from tailserve.bench.main import UsageError, _token_counter, base_url, ladder
from tailserve.bench.prom import histogram_quantile, parse, server_view
from tailserve.bench.runner import Load, arrival_times
from tailserve.bench.stats import SLO, bucket_of, capacity, percentile, summarize
from tailserve.bench.workloads import WORKLOADS, WorkloadParams, build_workload, est_tokens


def _texts(name: str, seed: int, n: int = 30) -> list[str]:
    w = build_workload(name, n, seed, WorkloadParams(context_len=1000))
    return [(s.system or "") + t.user for s in w.sessions for t in s.turns]


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_seeded_and_sized(name: str) -> None:
    assert _texts(name, 1) == _texts(name, 1)
    assert _texts(name, 1) != _texts(name, 2)
    assert build_workload(name, 30, 1, WorkloadParams(context_len=1000)).num_requests == 30


def test_pipeline_workload_histories() -> None:
    w = build_workload("pipeline", 4, 0, WorkloadParams(history_tokens=2000))
    for s in w.sessions:
        assert s.turns[0].tag == "pipeline" and "?" in s.turns[0].user
        assert [m["role"] for m in s.history[:2]] == ["user", "assistant"]
        assert 2000 <= sum(est_tokens(m["content"]) for m in s.history) < 2400
    assert build_workload("pipeline", 2, 0).sessions[0].history == ()


def test_workload_shapes() -> None:
    chat = build_workload("chat", 5, 0)
    assert len({s.system for s in chat.sessions}) == 1
    assert 360 <= est_tokens(chat.sessions[0].system or "") <= 440
    strag = build_workload("straggler", 30, 0)
    longs = [i for i, s in enumerate(strag.sessions) if s.turns[0].tag == "long"]
    assert longs == [9, 19, 29]
    assert est_tokens(strag.sessions[9].turns[0].user) >= 1900
    assert all(est_tokens(s.turns[0].user) < 200 for s in strag.sessions if s.turns[0].tag != "long")
    multi = build_workload("multiturn", 40, 0)
    assert all(1 <= len(s.turns) <= 6 for s in multi.sessions) and len(multi.sessions) < 40
    over = build_workload("oversized", 40, 0, WorkloadParams(context_len=500))
    big = [s.turns[0] for s in over.sessions if s.turns[0].tag == "oversized"]
    assert big and all(est_tokens(t.user) > 500 for t in big)
    drop = build_workload("disconnect", 40, 0, WorkloadParams(output_tokens=20))
    cut = [s.turns[0].disconnect_after for s in drop.sessions if s.turns[0].tag == "disconnect"]
    assert cut and all(1 <= c <= 10 for c in cut)
    with pytest.raises(ValueError, match="context"):
        build_workload("oversized", 4, 0)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = sorted(rng.random() for _ in range(n))
        for q in (0, 50, 90, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def _rec(i: int, ttft: float, gap: float, n: int, status: str = "ok", tag: str = "normal") -> RequestRecord:
    r = RequestRecord(i, i, 0, tag, 100, n, status=status, start=10.0)
    r.token_times = [10.0 + ttft + k * gap for k in range(n)]
    r.end = r.token_times[-1] if r.token_times else 10.0
    r.output_tokens = n
    return r


def test_summary_definitions_and_goodput() -> None:
    recs = [_rec(i, 0.1 * (i + 1), 0.01, 11) for i in range(4)]  # TTFT 0.1 .. 0.4, TPOT 0.01
    recs.append(_rec(4, 0.05, 0.2, 3))  # fast first token, slow after: fails the TPOT SLO
    recs.append(_rec(5, 0.0, 0.0, 0, status="shed"))
    recs.append(_rec(6, 0.05, 0.5, 3, tag="slowreader"))  # unhappy: reported by tag only
    s = summarize(recs, wall_s=2.0, slo=SLO(ttft=0.25, tpot=0.05))
    lat = s["latency"]
    assert lat["ttft_s"]["n"] == 5 and lat["ttft_s"]["p50"] == pytest.approx(0.2)
    assert lat["tpot_s"]["p50"] == pytest.approx(0.01)
    assert lat["itl_s"]["n"] == 4 * 10 + 2  # every gap counts: token-weighted
    assert lat["e2e_s"]["max"] == pytest.approx(0.4 + 0.1)
    assert s["counts"]["shed"] == 1 and s["counts"]["measured"] == 6
    assert s["goodput"]["met"] == 2  # TTFT 0.1 and 0.2 with TPOT 0.01
    assert s["goodput"]["share"] == pytest.approx(2 / 6) and s["goodput"]["req_per_s"] == pytest.approx(1.0)
    assert s["throughput"]["req_per_s"] == pytest.approx(6 / 2.0)  # every completed request
    assert s["by_tag"]["slowreader"]["n"] == 1 and "slowreader" in s["by_tag"]
    assert s["errors_by_status"] == {"shed": 1}
    assert bucket_of(100) == "0-127" and bucket_of(600) == "512-1023" and bucket_of(5000) == ">=2048"


def test_capacity_stops_at_first_miss() -> None:
    pts = [(float(c), {"goodput": {"share": sh}}) for c, sh in ((1, 1.0), (2, 0.95), (4, 0.5), (8, 0.95))]
    assert capacity(pts, 0.9) == {
        "attainment": 0.9,
        "max_load_meeting_slo": 2.0,
        "first_load_missing_slo": 4.0,
    }
    assert capacity([(1.0, {"goodput": None})], 0.9) is None


METRICS_BEFORE = """
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1
vllm:time_to_first_token_seconds_bucket{le="0.2",model_name="m"} 1
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 1
vllm:time_to_first_token_seconds_count{model_name="m"} 1
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.05
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 100
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="m"} 10
"""
METRICS_AFTER = """
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 3
vllm:time_to_first_token_seconds_bucket{le="0.2",model_name="m"} 5
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 5
vllm:time_to_first_token_seconds_count{model_name="m"} 5
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.55
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="m"} 300
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="m"} 160
"""


def test_server_view_from_metric_deltas() -> None:
    before, after = parse(METRICS_BEFORE), parse(METRICS_AFTER)
    v = server_view(before, after, client_ttft_mean=0.125)
    assert v["metric_prefixes"] == ["vllm:"]
    assert v["prefix_cache_hit_rate"] == pytest.approx(150 / 200)
    assert v["spec_decode_acceptance_rate"] is None
    assert v["ttft_count"] == 4 and v["ttft_mean_s"] == pytest.approx(0.125)
    assert v["ttft_p50_s"] == pytest.approx(0.1)  # 2 of 4 new observations are <= 0.1
    assert not v["ttft_disagrees"]
    assert server_view(before, after, client_ttft_mean=0.2)["ttft_disagrees"]
    assert histogram_quantile(0.75, [(0.1, 2.0), (0.2, 4.0), (float("inf"), 4.0)]) == pytest.approx(0.15)


def test_arrivals() -> None:
    at = arrival_times(Load("poisson", 50.0), 2000, seed=3)
    assert at == sorted(at) and at == arrival_times(Load("poisson", 50.0), 2000, seed=3)
    assert at[-1] / len(at) == pytest.approx(1 / 50, rel=0.1)
    assert arrival_times(Load("burst", 2, burst_interval=1.5), 5, 0) == [1.5, 1.5, 3.0, 3.0, 4.5]


def test_tokenizer_counter(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "w0": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    assert _token_counter(tmp_path)(" w0 w1 w2") == 3
    with pytest.raises(UsageError):
        _token_counter(tmp_path / "missing.json")


def test_flags() -> None:
    assert _seconds("250ms") == pytest.approx(0.25) and _seconds("2s") == 2.0 and _seconds("40") == 0.04
    with pytest.raises(argparse.ArgumentTypeError):
        _seconds("fast")
    assert base_url("http://h:1/v1/") == "http://h:1" and base_url("http://h:1") == "http://h:1"
    assert ladder("closed", 12) == [1, 2, 4, 8, 12] and ladder("poisson", 8) == [1, 2, 4, 8]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--url", "http://x", "--rate", "1,2", "--slo-ttft", "1s"])
    assert args.rate == [1.0, 2.0] and args.slo_ttft == 1.0 and args.bench_command is None
    args = parser.parse_args(["bench", "compare", "a.json", "b.json"])
    assert args.bench_command == "compare"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--concurrency", "0"])


def test_chat_system_prompts_and_hot_share() -> None:
    from collections import Counter

    from tailserve.bench.workloads import WorkloadParams, build_workload

    spread = build_workload("chat", 400, 3, WorkloadParams(system_prompts=8))
    even = Counter(s.system for s in spread.sessions)
    assert len(even) == 8 and min(even.values()) > 20
    hot = build_workload("chat", 400, 3, WorkloadParams(system_prompts=8, hot_share=0.8))
    counts = sorted(Counter(s.system for s in hot.sessions).values())
    assert len(counts) == 8 and 0.7 < counts[-1] / 400 < 0.9
    assert hot.params["hot_share"] == 0.8
    assert len({s.system for s in build_workload("chat", 50, 3).sessions}) == 1  # the default: one prompt
