"""Disconnect storm: streams dropped by their clients at random moments (before the response, after the
headers, mid-stream; FIN or RST), against `tailserve serve` and through the gateway in front of it, then:
nothing running, nothing waiting, KV usage zero, and the next request served.

    flock /work/bench.lock .venv/bin/python benchmarks/storm.py [--streams 1000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from harness import RECORDED, header
from reliability import MODEL, served, server_and_gateway, settled

from tailserve.bench.storm import storm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000, help="per target (server, then gateway)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    body = {"prompt": "Write about the sea and the river.", "max_tokens": 48, "ignore_eos": True}
    summary: dict[str, dict] = {}
    with server_and_gateway() as (server, gateway):
        for name, url, model in (("server", server.url, MODEL), ("gateway", gateway.url, "chat")):
            req = {**body, "model": model}
            r = asyncio.run(storm(url, "/v1/completions", req, args.streams, args.concurrency, args.seed))
            idle = settled(server)
            summary[name] = {
                "streams": r.streams,
                "dropped": dict(r.by_moment),
                "finished_before_drop": r.finished_first,
                "refused": r.refused,
                "client_errors": len(r.errors),
                "seconds": round(r.seconds, 1),
                "idle_gauges_after": idle,
                "next_request_served": served(url, model),
            }
    (RECORDED / "storm.json").write_text(json.dumps(summary, indent=2))
    print(header("Disconnect storm", f"python benchmarks/storm.py --streams {args.streams}"))
    print(json.dumps(summary))
    leaks = sum(sum(s["idle_gauges_after"].values()) > 0 for s in summary.values())
    good = not leaks and all(s["next_request_served"] and not s["client_errors"] for s in summary.values())
    dropped = sum(sum(s["dropped"].values()) for s in summary.values())
    print(
        f"storm: {'PASS' if good else 'FAIL'} — {2 * args.streams} streams "
        f"({dropped} dropped by the client), "
        f"{leaks} targets with leaks, next request served: "
        f"{all(s['next_request_served'] for s in summary.values())}"
    )


if __name__ == "__main__":
    main()
