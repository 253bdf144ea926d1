"""A whole benchmark: find the model, warm up, run each load point between two /metrics scrapes,
then print, save and plot. `run_from_args` is what `tailserve bench` calls."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import tailserve
from tailserve.bench.client import ClientConfig, RequestRecord
from tailserve.bench.prom import scrape, server_view
from tailserve.bench.report import SCHEMA, make_console, print_run, print_sweep, write_outputs
from tailserve.bench.runner import Load, Runner, context_len_of, discover
from tailserve.bench.stats import SLO, capacity, summarize
from tailserve.bench.workloads import WorkloadParams, build_workload


class UsageError(ValueError):
    """A flag combination that cannot run; reported without a traceback."""


def base_url(url: str) -> str:
    """The server root: `http://host:port/v1/` and `http://host:port` both give the latter."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def ladder(mode: str, top: float) -> list[float]:
    """The default sweep up to `top`: doubling concurrencies or burst sizes, rates top/8 .. top."""
    if mode == "poisson":
        return [top / 8, top / 4, top / 2, top]
    out: list[float] = []
    k = 1
    while k < top:
        out.append(k)
        k *= 2
    return [*out, top]


def loads_from_args(args: argparse.Namespace) -> list[Load]:
    given = {
        m: v
        for m, v in (("closed", args.concurrency), ("poisson", args.rate), ("burst", args.burst_size))
        if v
    }
    if len(given) > 1:
        raise UsageError("give only one of --concurrency, --rate and --burst-size")
    mode = args.arrival or next(iter(given), "burst" if args.workload == "burst" else "closed")
    if given and mode not in given:
        raise UsageError(f"--arrival {mode} does not go with the load flag given")
    defaults = {"closed": [8], "burst": [16], "poisson": None}
    values = given.get(mode) or defaults[mode]
    if values is None:
        raise UsageError("Poisson arrivals need --rate")
    if args.sweep and len(values) == 1:
        values = ladder(mode, values[0])
    return [Load(mode, float(v), args.burst_interval) for v in values]


def _token_counter(path: Path) -> Callable[[str], int]:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise UsageError(f"cannot load the tokenizer {file}: {e}") from None
    return lambda text: len(tk.encode(text, add_special_tokens=False).ids)


def _commit() -> str | None:
    """The tailserve checkout's commit, when it runs from one (benchmarks record it)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(tailserve.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:>18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]}  shed {task.fields[shed]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
        refresh_per_second=4,
    )


def _tracker(progress: Progress, description: str, total: int) -> Callable[[RequestRecord], None]:
    counts = {"ok": 0, "shed": 0, "failed": 0}
    task = progress.add_task(description, total=total, **counts)

    def done(rec: RequestRecord) -> None:
        key = rec.status if rec.status in counts else "failed" if rec.status in ("error", "timeout") else None
        if key:
            counts[key] += 1
        progress.update(task, advance=1, **counts)

    return done


async def benchmark(args: argparse.Namespace, loads: list[Load], slo: SLO, progress: Progress) -> dict:
    """Run every load point and return the result dictionary (the content of bench.json)."""
    url = base_url(args.url)
    card = None
    if args.model is None or (args.workload == "oversized" and args.context_len is None):
        card = await discover(url, args.api_key)
        if card is None and args.model is None:
            raise UsageError(f"{url}/v1/models lists no model: name one with --model")
    model = args.model or card["id"]
    params = WorkloadParams(
        output_tokens=args.output_tokens,
        disconnect_share=args.disconnect_share,
        straggler_every=args.straggler_every,
        long_tokens=args.long_tokens,
        system_prompts=args.system_prompts,
        hot_share=args.hot_share,
        context_len=args.context_len or (context_len_of(card) if card else None),
        history_tokens=args.history_tokens,
    )
    try:
        workload = build_workload(args.workload, args.requests, args.seed, params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = ClientConfig(
        base_url=url,
        model=model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout=args.timeout,
        keep_alive=args.keep_alive,
        read_delay=args.read_delay,
        count_tokens=_token_counter(args.tokenizer) if args.tokenizer else None,
    )
    runner = Runner(cfg)
    runs = []
    try:
        if args.warmup > 0:
            warm = build_workload(
                "chat", args.warmup, args.seed + 1, WorkloadParams(output_tokens=args.output_tokens)
            )
            runner.on_done = _tracker(progress, "warm-up", warm.num_requests)
            res = await runner.run(warm, Load("closed", args.warmup), args.duration)
            bad = [r for r in res.records if r.status != "ok"]
            if bad:
                progress.console.print(
                    f"[yellow]warm-up: {len(bad)} of {len(res.records)} failed: {bad[0].error}[/]"
                )
        for load in loads:
            runner.on_done = _tracker(progress, load.label(), workload.num_requests)
            before = await scrape(url, args.api_key)
            res = await runner.run(workload, load, args.duration, args.seed)
            after = await scrape(url, args.api_key) if before is not None else None
            summary = summarize(res.records, res.wall_s, slo, workload.num_requests - len(res.records))
            server = None
            if before is not None and after is not None:
                seen = [r.ttft for r in res.records if r.ttft is not None and r.status != "cancelled"]
                server = server_view(before, after, sum(seen) / len(seen) if seen else None)
            runs.append(
                {
                    "label": load.label(),
                    "load": load.to_json(),
                    "hit_duration_cap": res.hit_duration_cap,
                    "summary": summary,
                    "server": server,
                    "requests": [r.to_json(res.t0) for r in res.records],
                }
            )
    finally:
        await runner.aclose()
    return {
        "schema": SCHEMA,
        "meta": {
            "tool": f"tailserve bench {tailserve.__version__}",
            "tailserve_commit": _commit(),
            "command": " ".join(["tailserve", *sys.argv[1:]]) if sys.argv[0].endswith("tailserve") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
        },
        "config": {
            "url": url,
            "model": model,
            "endpoint": args.endpoint,
            "workload": workload.name,
            "workload_params": workload.params,
            "requests": workload.num_requests,
            "seed": args.seed,
            "warmup": args.warmup,
            "duration_cap_s": args.duration,
            "output_tokens": args.output_tokens,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "timeout_s": args.timeout,
            "keep_alive": args.keep_alive,
            "slo": slo.to_json() if slo.is_set() else None,
            "slo_attainment": args.slo_attainment,
        },
        "runs": runs,
        "capacity": capacity(
            [(ld.value, r["summary"]) for ld, r in zip(loads, runs, strict=True)], args.slo_attainment
        )
        if len(runs) > 1
        else None,
    }


def run_from_args(args: argparse.Namespace) -> int:
    console = make_console()
    try:
        loads = loads_from_args(args)
        slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_e2e)
        with _progress(args.quiet) as progress:
            result = asyncio.run(benchmark(args, loads, slo, progress))
    except UsageError as e:
        console.print(f"[red]tailserve bench: {e}[/]")
        return 2
    except (httpx.HTTPError, ValueError) as e:  # unreachable, refused, or not an OpenAI server
        console.print(f"[red]tailserve bench: cannot use {args.url}: {type(e).__name__}: {e}[/]")
        return 2
    if len(result["runs"]) == 1:
        print_run(console, result["runs"][0])
    else:
        print_sweep(console, result)
    out_dir = args.out or Path("bench-results") / f"{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_outputs(result, out_dir, args.plots)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if any(r["summary"]["counts"]["ok"] for r in result["runs"]) else 1
