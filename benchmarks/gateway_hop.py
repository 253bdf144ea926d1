"""The gateway's own cost, without a model: TTFT and ITL of a zero-work fake backend measured
directly and through `tailserve gateway` servers that differ only in their event loop and upstream
client, in one run.

The fake backend answers every streamed chat request with `--chunks` SSE chunks, `--gap` ms apart, at
once: what remains of a request's TTFT is the HTTP hops, so the difference to direct is the gateway's
added latency alone (on a model backend it hides under the step's noise and the cores the step fills).
Requests alternate between the endpoints one by one (c=1), or go in interleaved bursts of `--burst`
(c=burst), so drift hits all alike. `--against DIR` adds the gateway of another checkout (e.g. a `git
archive` of an older commit: its own src/ and benchmarks/) to the same rounds, for a before/after.

    .venv/bin/python benchmarks/gateway_hop.py [--requests 400] [--burst 16] [--against DIR]
    .venv/bin/python benchmarks/gateway_hop.py --serve-fake PORT           (internal)
    .venv/bin/python benchmarks/gateway_hop.py --serve-gateway URL PORT LOOP HTTP CLIENT  (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from harness import quantile

MODEL = "fake"
PORT = 8150


def fake_app(chunks: int, gap: float) -> Any:
    """The least an OpenAI backend can do: models, and a stream of fixed chunks."""
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})
    chunk = b'data: {"id":"x","object":"chat.completion.chunk",'
    chunk += b'"choices":[{"index":0,"delta":{"content":"t"}}]}\n\n'

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": models.encode()})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for i in range(chunks):
            if i:
                await asyncio.sleep(gap)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def serve_gateway(url: str, port: int, loop: str, http: str, client: str, cpus: str = "") -> None:
    """`tailserve gateway --backend URL` on `loop` (uvloop or asyncio), with the upstream client the
    gateway's own (h1) or httpx's (its API is the one h1client copies). `http` is ignored: this
    checkout's gateway has one HTTP server, its own front. The argument stays so that `--against` can
    start an older checkout's gateway, whose uvicorn took "httptools" or "h11" there. `cpus`, as
    "cpu1" or "cpu0+1", pins the gateway (its `cpus` setting)."""
    from tailserve.gateway import pools
    from tailserve.gateway.app import Gateway, run_gateway
    from tailserve.gateway.cli import config_from_backends
    from tailserve.gateway.config import parse_config
    from tailserve.gateway.pools import make_pools

    if client == "httpx":
        pools.make_client = lambda _cap: httpx.AsyncClient(timeout=None, trust_env=False)  # type: ignore

    config = parse_config(config_from_backends([url]))
    if cpus:
        config.cpus = [int(c) for c in cpus.removeprefix("cpu").split("+")]
    urls = {(m, i): [(b.url, b.kind)] for m, s in config.models.items() for i, b in enumerate(s.backends)}
    gateway = Gateway(config, make_pools(config, urls))
    Path(f"/tmp/tailserve-hop-{port}.pid").write_text(str(os.getpid()))  # for its CPU time
    main = run_gateway(gateway, asyncio.Event(), host="127.0.0.1", port=port)
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def one(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[float, list[float]]:
    """TTFT (to the first content byte) and the gaps between later chunks of one streamed request."""
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"}) as r:  # fmt: skip
        r.raise_for_status()
        times = [time.perf_counter() async for _ in r.aiter_raw()]
    return times[0] - start, [b - a for a, b in itertools.pairwise(times)]


def cpu_seconds(url: str) -> float:
    """User + system CPU time so far of the gateway serving `url` (0 for the fake backend)."""
    pid_file = Path(f"/tmp/tailserve-hop-{url.rsplit(':', 1)[1]}.pid")
    if not pid_file.exists():
        return 0.0
    fields = Path(f"/proc/{pid_file.read_text()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(urls: dict[str, str], requests: int, burst: int) -> dict[str, dict[str, list[float]]]:
    messages = [{"role": "system", "content": "s" * 2000}, {"role": "user", "content": "hi"}]
    body = json.dumps({"model": MODEL, "stream": True, "messages": messages}).encode()
    out = {n: {"ttft": [], "itl": [], "cpu": []} for n in urls}
    # Idle connections dropped after 1 s, well before uvicorn's 5 s keep-alive closes them under us.
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=1.0)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
        for u in urls.values():  # warm: connections, imports, first-call paths
            for _ in range(max(4, burst)):
                await one(client, u, body)
        for i in range(requests // burst):
            names = list(urls) if i % 2 == 0 else list(urls)[::-1]
            for n in names:
                cpu = cpu_seconds(urls[n])
                results = await asyncio.gather(*(one(client, urls[n], body) for _ in range(burst)))
                out[n]["cpu"].append((cpu_seconds(urls[n]) - cpu) / burst)
                for ttft, itl in results:
                    out[n]["ttft"].append(ttft)
                    out[n]["itl"] += itl
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve-fake", type=int)
    ap.add_argument("--serve-gateway", nargs="+", metavar="URL PORT LOOP HTTP CLIENT [CPUS]")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--gap", type=float, default=5.0, help="ms between chunks")
    ap.add_argument(
        "--variants", default="uvloop/front/h1", help="LOOP/HTTP/CLIENT[/cpuN[+M]], comma-separated"
    )
    ap.add_argument("--tag", default="")
    ap.add_argument("--against", type=Path, help="another checkout whose gateway joins the rounds")
    args = ap.parse_args()
    if args.serve_fake:
        import uvicorn

        uvicorn.run(fake_app(args.chunks, args.gap / 1e3), host="127.0.0.1", port=args.serve_fake,
                    loop="uvloop", http="httptools", access_log=False, log_level="warning")  # fmt: skip
        return
    if args.serve_gateway:
        url, port, loop, http, client, *cpus = args.serve_gateway
        serve_gateway(url, int(port), loop, http, client, *cpus)
        return
    from harness import RECORDED, RESULTS, header, serving  # imports torch: not in the servers

    me = [sys.executable, str(Path(__file__).resolve())]
    variants = args.variants.split(",")
    with contextlib.ExitStack() as stack:
        fake_cmd = [*me, "--serve-fake", str(PORT), "--chunks", str(args.chunks), "--gap", str(args.gap)]
        fake = stack.enter_context(serving(fake_cmd, PORT, RESULTS / "hop-fake.log"))
        urls = {"direct": fake}
        for i, v in enumerate(variants):
            port = PORT + 1 + i
            cmd = [*me, "--serve-gateway", fake, str(port), *v.split("/")]
            urls["gateway " + v] = stack.enter_context(serving(cmd, port, RESULTS / f"hop-gw-{i}.log"))
        if args.against is not None:
            port = PORT + 1 + len(variants)
            base = args.against.resolve()
            path = f"PYTHONPATH={base / 'src'}{os.pathsep}{base / 'benchmarks'}"
            script = str(base / "benchmarks" / "gateway_hop.py")
            loop = ["uvloop", "httptools", "h1"]
            cmd = ["env", path, sys.executable, script, "--serve-gateway", fake, str(port), *loop]
            log = RESULTS / "hop-gw-base.log"
            urls[f"gateway @{base.name}"] = stack.enter_context(serving(cmd, port, log))
        results = {}
        for conc in (1, args.burst):
            n = args.requests if conc > 1 else args.requests // 2
            results[conc] = asyncio.run(measure(urls, n, conc))
    summary = {}
    for conc, res in results.items():
        for n, r in res.items():
            summary[f"{n} c={conc}"] = {
                "ttft_p50_s": quantile(r["ttft"], 0.5),
                "ttft_p99_s": quantile(r["ttft"], 0.99),
                "itl_p50_s": quantile(r["itl"], 0.5),
                "itl_p99_s": quantile(r["itl"], 0.99),
                "n": len(r["ttft"]),
                "cpu_per_request_s": sum(r["cpu"]) / len(r["cpu"]),
            }
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / f"gateway_hop{'-' + args.tag if args.tag else ''}.json").write_text(
        json.dumps({"config": vars(args), "summary": summary}, indent=2, default=str)
    )
    print(header("Gateway hop (fake backend)", "python benchmarks/gateway_hop.py"))
    cols = ["endpoint", "conc", "n", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "added p50", "added p99"]
    print("| " + " | ".join([*cols, "CPU/req"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for conc in results:
        d = summary[f"direct c={conc}"]
        for n in results[conc]:
            s = summary[f"{n} c={conc}"]
            cells = [n, str(conc), str(s["n"])]
            cells += [f"{s[k] * 1e3:.2f} ms" for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")]
            cells += (
                ["", "", ""] if n == "direct"
                else [f"{(s[k] - d[k]) * 1e3:+.2f} ms" for k in ("ttft_p50_s", "ttft_p99_s")]
                + [f"{s['cpu_per_request_s'] * 1e3:.2f} ms"]
            )  # fmt: skip
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
