"""Soak: a mixed workload for a long time against `tailserve serve` and, at once, the gateway in front of
it; resident memory sampled, p99 TTFT per window, KV usage and queues back to zero when idle.

    flock /work/bench.lock .venv/bin/python benchmarks/soak.py [--minutes 30] [--window 300]

The mix, one client loop each, half of them through the gateway: chat turns (short prompts), long
prompts (~1,500 tokens), three-turn conversations (each turn resends the history), bursts of 12 at
once every 20 s, streams dropped mid-way, and prompts over the context (answered 400). Memory: the
least-squares slope of the server's RSS after the first fifth of the run (warm-up). Verdict: slope
under 1 MiB/min, every window's p99 TTFT within 2x of the first window's, gauges zero when idle, and
every request answered as expected (no 5xx, no failure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from harness import RECORDED, header
from reliability import MODEL, server_and_gateway, settled

WORDS = [
    "the",
    "sea",
    "river",
    "mountain",
    "city",
    "light",
    "window",
    "paper",
    "story",
    "garden",
    "music",
    "winter",
    "morning",
]


@dataclass
class Tally:
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (time since start, seconds)
    ok: int = 0
    dropped: int = 0
    rejected: int = 0  # oversized prompts answered 400, as they must be
    shed: int = 0  # 429: load shedding, not a fault
    failed: list[str] = field(default_factory=list)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def stream(c: httpx.AsyncClient, url: str, body: dict, t0: float, tally: Tally, drop: int = 0) -> str:
    """One streaming request; records its TTFT; returns the answer's text ("" when dropped/failed)."""
    sent = time.perf_counter()
    out, first = [], None
    try:
        async with c.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                if r.status_code == 429:
                    tally.shed += 1
                else:
                    tally.failed.append(f"{r.status_code}: {r.text[:200]}")
                return ""
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    tally.failed.append(json.dumps(data)[:200])
                    return ""
                piece = "".join(
                    ch.get("delta", {}).get("content") or ch.get("text") or "" for ch in data["choices"]
                )
                if piece and first is None:
                    first = time.perf_counter() - sent
                out.append(piece)
                if drop and len(out) >= drop:
                    tally.dropped += 1
                    return ""
    except httpx.HTTPError as e:
        tally.failed.append(f"{type(e).__name__}: {e}")
        return ""
    if first is not None:
        tally.ttft.append((sent - t0, first))
    tally.ok += 1
    return "".join(out)


async def drive(base: str, model: str, seconds: float, seed: int, tally: Tally, t0: float) -> None:
    rng = random.Random(seed)
    chat_url, comp_url = base + "/v1/chat/completions", base + "/v1/completions"
    end = t0 + seconds

    def chat(content: str, tokens: int = 24) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens}

    async with httpx.AsyncClient(timeout=120) as c:

        async def chats() -> None:
            while time.perf_counter() < end:
                await stream(c, chat_url, chat(text(rng, rng.randint(5, 60))), t0, tally)

        async def longs() -> None:
            while time.perf_counter() < end:
                await stream(c, chat_url, chat(text(rng, 1500), 16), t0, tally)
                await asyncio.sleep(2)

        async def conversations() -> None:
            while time.perf_counter() < end:
                messages: list[dict] = []
                for _ in range(3):
                    messages.append({"role": "user", "content": text(rng, 30)})
                    reply = await stream(c, chat_url, {**chat(""), "messages": messages}, t0, tally)
                    messages.append({"role": "assistant", "content": reply or "ok"})

        async def bursts() -> None:
            while time.perf_counter() < end:
                await asyncio.sleep(20)
                await asyncio.gather(
                    *(stream(c, chat_url, chat(text(rng, 20)), t0, tally) for _ in range(12))
                )

        async def disconnects() -> None:
            while time.perf_counter() < end:
                body = {"model": model, "prompt": text(rng, 40), "max_tokens": 64, "ignore_eos": True}
                await stream(c, comp_url, body, t0, tally, drop=rng.randint(1, 30))
                await asyncio.sleep(0.5)

        async def oversized() -> None:
            while time.perf_counter() < end:
                r = await c.post(comp_url, json={"model": model, "prompt": text(rng, 12000), "max_tokens": 4})
                if r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded":
                    tally.rejected += 1
                else:
                    tally.failed.append(f"oversized: {r.status_code} {r.text[:200]}")
                await asyncio.sleep(5)

        await asyncio.gather(chats(), longs(), conversations(), bursts(), disconnects(), oversized())


def windows(ttft: list[tuple[float, float]], width: float) -> list[dict]:
    out = []
    for start in np.arange(0, max(t for t, _ in ttft) + 1e-9, width):
        xs = [v for t, v in ttft if start <= t < start + width]
        if xs:
            out.append({"start_s": float(start), "n": len(xs), "p99_ms": float(np.percentile(xs, 99) * 1e3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--window", type=float, default=300.0, help="seconds per p99 TTFT window")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seconds = args.minutes * 60
    with server_and_gateway() as (server, gateway):
        rss: list[tuple[float, float, float]] = []
        direct, via = Tally(), Tally()

        async def run() -> None:
            t0 = time.perf_counter()

            async def sample() -> None:
                while time.perf_counter() < t0 + seconds:
                    rss.append((time.perf_counter() - t0, server.rss_mib(), gateway.rss_mib()))
                    await asyncio.sleep(5)

            await asyncio.gather(
                drive(server.url, MODEL, seconds, args.seed, direct, t0),
                drive(gateway.url, "chat", seconds, args.seed + 1, via, t0),
                sample(),
            )

        asyncio.run(run())
        idle = settled(server)
    report(args, rss, direct, via, idle)


def slope(points: list[tuple[float, float]]) -> float:
    """MiB per minute, least squares."""
    t, y = np.array([p[0] for p in points]) / 60, np.array([p[1] for p in points])
    return float(np.polyfit(t, y, 1)[0])


def report(args: argparse.Namespace, rss: list, direct: Tally, via: Tally, idle: dict[str, float]) -> None:
    warm = [r for r in rss if r[0] >= 0.2 * args.minutes * 60]
    server_slope = slope([(t, s) for t, s, _ in warm])
    gateway_slope = slope([(t, g) for t, _, g in warm])
    wins = {name: windows(t.ttft, args.window) for name, t in (("server", direct), ("gateway", via))}
    drift = max(w[-1]["p99_ms"] / w[0]["p99_ms"] for w in wins.values())
    worst = max(max(x["p99_ms"] for x in w) / w[0]["p99_ms"] for w in wins.values())
    failures = direct.failed + via.failed
    summary = {
        "minutes": args.minutes,
        "window_s": args.window,
        "rss_mib": {"server_first": rss[0][1], "server_last": rss[-1][1], "gateway_last": rss[-1][2]},
        "rss_slope_mib_per_min": {"server": server_slope, "gateway": gateway_slope},
        "p99_ttft_windows": wins,
        "idle_gauges": idle,
        "counts": {
            name: {"ok": t.ok, "dropped": t.dropped, "rejected_400": t.rejected, "shed_429": t.shed,
                   "failed": len(t.failed)}
            for name, t in (("server", direct), ("gateway", via))
        },
        "failures": failures[:20],
    }  # fmt: skip
    (RECORDED / "soak.json").write_text(json.dumps(summary, indent=2))
    good = (
        abs(server_slope) < 1.0
        and abs(gateway_slope) < 1.0
        and worst <= 2.0
        and not any(idle.values())
        and not failures
    )
    print(header("Soak", f"python benchmarks/soak.py --minutes {args.minutes:g} --window {args.window:g}"))
    print(json.dumps(summary["counts"]), json.dumps(summary["rss_slope_mib_per_min"]))
    for name, w in wins.items():
        print(name, " ".join(f"{x['p99_ms']:.0f}" for x in w), "ms p99 TTFT per window")
    print(
        f"soak: {'PASS' if good else 'FAIL'} — {args.minutes:g} min, RSS slope {server_slope:+.2f} MiB/min "
        f"(gateway {gateway_slope:+.2f}), p99 TTFT last/first window {drift:.2f}x (worst {worst:.2f}x), "
        f"idle {idle}, {len(failures)} failures"
    )


if __name__ == "__main__":
    main()
