"""`tailserve bench` and `tailserve bench compare`.

Only argparse is imported at module level: `tailserve` builds every subcommand's parser on each
start, and the benchmark's dependencies (httpx, rich, matplotlib) are paid for only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tailserve.bench.workloads import WORKLOADS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` (and its `compare`) on the top-level CLI."""
    p = subparsers.add_parser(
        "bench",
        help="measure an OpenAI-compatible server's latency under load (ours, vLLM, llama.cpp)",
        description="Drive streaming requests at a server and report TTFT, ITL, TPOT, e2e latency, "
        "throughput and goodput. See docs/bench.md for the definitions.",
    )
    p.set_defaults(func=_run)
    target = p.add_argument_group("target")
    target.add_argument(
        "--url", help="the server's base URL, e.g. http://127.0.0.1:8000 (the only host contacted)"
    )
    target.add_argument("--model", help="model name to request (default: the first id from GET /v1/models)")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")

    load = p.add_argument_group("load (one of --concurrency, --rate, --burst-size; comma lists sweep)")
    load.add_argument("--workload", choices=WORKLOADS, default="chat")
    load.add_argument(
        "--concurrency",
        type=_list(int),
        metavar="C[,C..]",
        help="closed loop: requests in flight (default 8)",
    )
    load.add_argument(
        "--rate", type=_list(float), metavar="R[,R..]", help="open loop: Poisson arrivals per second"
    )
    load.add_argument(
        "--burst-size",
        type=_list(int),
        metavar="B[,B..]",
        help="open loop: sessions arriving at once per burst",
    )
    load.add_argument("--burst-interval", type=float, default=5.0, help="seconds between bursts (default 5)")
    load.add_argument(
        "--arrival",
        choices=("closed", "poisson", "burst"),
        help="arrival mode (default: from the load flag given; `burst` for the burst workload)",
    )
    load.add_argument(
        "--sweep",
        action="store_true",
        help="with a single load value V, sweep up to it (1, 2, 4 .. V; rates V/8 .. V)",
    )
    load.add_argument("--requests", type=int, default=100, help="requests per load point (default 100)")
    load.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="cap in seconds per load point; what is in flight then is cancelled (default 600)",
    )
    load.add_argument("--warmup", type=int, default=4, help="unmeasured chat requests sent first (default 4)")
    load.add_argument("--seed", type=int, default=0)

    req = p.add_argument_group("requests")
    req.add_argument(
        "--output-tokens", type=int, default=128, help="max_tokens of each request (default 128)"
    )
    req.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (then outputs may end before --output-tokens)",
    )
    req.add_argument("--temperature", type=float, default=0.0)
    req.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed for one request (default 300)"
    )
    req.add_argument(
        "--keep-alive", action="store_true", help="reuse connections (default: a fresh one each)"
    )
    req.add_argument(
        "--context-len", type=int, help="the server's context length (oversized; else from /v1/models)"
    )
    req.add_argument(
        "--disconnect-share", type=float, default=0.3, help="disconnect: share of clients that drop"
    )
    req.add_argument(
        "--straggler-every",
        type=int,
        default=10,
        help="straggler: every n-th request is the long one (0: none)",
    )
    req.add_argument(
        "--long-tokens", type=int, default=2048, help="straggler: approx tokens of the long prompt"
    )
    req.add_argument(
        "--system-prompts",
        type=int,
        default=1,
        help="chat: distinct system prompts the requests draw from (default 1: one shared prompt)",
    )
    req.add_argument(
        "--hot-share",
        type=float,
        default=None,
        help="chat: share of requests on the first system prompt (the rest spread evenly); default: all even",
    )
    req.add_argument(
        "--history-tokens",
        type=int,
        default=0,
        help="pipeline: approx tokens of earlier conversation sent before each question (default 0)",
    )
    req.add_argument(
        "--read-delay", type=float, default=0.1, help="slowreader: seconds slept after each streamed chunk"
    )
    req.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.json (or its folder) to count output tokens when the server gives no usage",
    )

    slo = p.add_argument_group("SLO (values like 500ms, 0.5s; a bare number is milliseconds)")
    slo.add_argument("--slo-ttft", type=_seconds, metavar="TIME", help="time to first token")
    slo.add_argument(
        "--slo-tpot", type=_seconds, metavar="TIME", help="time per output token after the first"
    )
    slo.add_argument("--slo-e2e", type=_seconds, metavar="TIME", help="whole request")
    slo.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet the SLO for a load to count (default 0.9)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, help="folder for bench.json and plots (default bench-results/NAME-TIME)"
    )
    out.add_argument("--no-plots", dest="plots", action="store_false")
    out.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    c = sub.add_parser("compare", help="print two saved runs side by side with ratios")
    c.add_argument("a", type=Path, help="bench.json of run A")
    c.add_argument("b", type=Path, help="bench.json of run B")
    c.set_defaults(func=_compare)


def _list(kind: type) -> object:
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values

    return parse


def _seconds(text: str) -> float:
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            return float(t[:-2]) / 1e3
        if t.endswith("s"):
            return float(t[:-1])
        return float(t) / 1e3
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 500ms or 0.5s)") from None


def _compare(args: argparse.Namespace) -> int:
    from tailserve.bench.report import compare, make_console

    return compare([args.a, args.b], make_console())


def _run(args: argparse.Namespace) -> int:
    if not args.url:
        print("tailserve bench: --url is required")
        return 2
    from tailserve.bench.main import run_from_args

    return run_from_args(args)
