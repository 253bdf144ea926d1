"""tailserve against vLLM's CPU build on the same JSON-schema workload: TTFT and decode tok/s.

Both servers run at once on 127.0.0.1 (the same GGUF; vLLM gets it converted, bf16, and uses xgrammar
on CPU). Each is loaded closed-loop at each concurrency with chat requests of their own prompt,
`response_format` json_schema (an array of at least 200 integers, so every request decodes exactly
`--tokens` tokens on both), streamed, greedy; then the same without a schema. Rounds alternate the
servers' order, and each row pools its rounds' requests (TTFT percentiles over all of them, tok/s
the median round's output tokens over wall time). Run under `flock /work/bench.lock`.

    python benchmarks/structured_peers.py [--concurrency 1,16] [--rounds 2] [--requests 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from harness import PEERS, RESULTS, quantile, serving, tailserve_cmd

from tailserve.models.loader import resolve_model

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}
PORTS = {"tailserve": 8110, "vllm": 8112}


async def one(
    client: httpx.AsyncClient, url: str, model: str, n: int, tokens: int, constrained: bool
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {n}: list 200 numbers as a JSON array."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "numbers", "schema": SCHEMA},
        }
    t0 = time.perf_counter()
    first, used, text = None, 0, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
    if constrained:
        assert text.startswith("["), f"not constrained: {text[:40]!r}"
    return {"ttft": first, "tokens": used, "end": time.perf_counter()}


async def closed_loop(
    url: str, model: str, c: int, requests: int, tokens: int, constrained: bool, base: int
) -> dict:
    todo = iter(range(base, base + requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker() -> None:
            for n in todo:
                results.append(await one(client, url, model, n, tokens, constrained))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    return {"ttft": [r["ttft"] for r in results], "tok_s": sum(r["tokens"] for r in results) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    gguf = str(resolve_model("smollm2-135m-instruct"))
    cmds = {
        "tailserve": [*tailserve_cmd(PORTS["tailserve"])],
        "vllm": ["bash", str(PEERS / "vllm_cpu.sh"), "serve", gguf, str(PORTS["vllm"])],
    }
    logs = RESULTS / "structured_peers"
    with (
        serving(cmds["vllm"], PORTS["vllm"], logs / "vllm.log", timeout=1200) as vllm_url,
        serving(cmds["tailserve"], PORTS["tailserve"], logs / "tailserve.log") as ts_url,
    ):
        urls = {"tailserve": ts_url, "vllm": vllm_url}
        models = {k: httpx.get(u + "/v1/models").json()["data"][0]["id"] for k, u in urls.items()}
        for name, url in urls.items():  # warm-up: compiles, first grammar
            asyncio.run(closed_loop(url, models[name], 1, 2, 8, True, 10_000))
        rows: dict[tuple, dict] = {}
        base = 0
        for c in (int(x) for x in args.concurrency.split(",")):
            for r in range(args.rounds):
                order = list(urls) if r % 2 == 0 else list(urls)[::-1]
                for constrained in (True, False):
                    for name in order:
                        got = asyncio.run(
                            closed_loop(
                                urls[name], models[name], c, args.requests, args.tokens, constrained, base
                            )
                        )
                        base += args.requests
                        row = rows.setdefault((c, constrained, name), {"ttft": [], "tok_s": []})
                        row["ttft"] += got["ttft"]
                        row["tok_s"].append(got["tok_s"])
    print("| c | workload | server | TTFT p50 | TTFT p99 | output tok/s |")
    print("|---|---|---|---|---|---|")
    for (c, constrained, name), row in rows.items():
        print(
            f"| {c} | {'json_schema' if constrained else 'free'} | {name} | "
            f"{1e3 * quantile(row['ttft'], 0.5):.0f} ms | "
            f"{1e3 * quantile(row['ttft'], 0.99):.0f} ms | {statistics.median(row['tok_s']):.1f} |"
        )


if __name__ == "__main__":
    main()
