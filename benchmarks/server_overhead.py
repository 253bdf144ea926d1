"""What the HTTP server adds: the same chat requests in-process (LLM) and over HTTP (tailserve serve), in
one run, alternated so the machine's drift hits both alike.

- concurrency 1: for each prompt, its time to first token in-process, then over HTTP (a streaming
  request on a fresh connection, timed to the first content chunk); reported as both p50s and the
  median of the per-prompt differences (prompts differ in length, so two medians alone mix prompt
  lengths into the overhead);
- concurrency 16: output tok/s of `tailserve bench` over HTTP vs the in-process engine running the
  same requests 16 at a time, alternated `--rounds` times (medians).

    .venv/bin/python benchmarks/server_overhead.py [--requests 16] [--requests-c16 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from harness import RECORDED, RESULTS, closed_loop, header, serving, tailserve_cmd

from tailserve.bench.workloads import WorkloadParams, build_workload
from tailserve.llm import LLM
from tailserve.sampling import SamplingParams

PORT = 8110


def conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    wl = build_workload("chat", n, seed, WorkloadParams(output_tokens=64))
    return [
        [{"role": "system", "content": s.system}, {"role": "user", "content": s.turns[0].user}]
        for s in wl.sessions
    ]


def local_ttft(llm: LLM, ids: list[int], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    stream = llm.stream(ids, params)
    for out in stream:
        if out.new_token_ids:
            first = time.perf_counter() - t0
            stream.close()  # aborts the request, as the HTTP client's disconnect does
            return first
    raise RuntimeError("no token")


def http_ttft(client: httpx.Client, url: str, messages: list[dict[str, str]], max_tokens: int) -> float:
    """From sending the request (a fresh connection) to its first content chunk. The client is made
    beforehand: constructing one costs ~20 ms (it loads a TLS context), which is not the server's."""
    body = {
        "model": client.get(f"{url}/v1/models").json()["data"][0]["id"],
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"Connection": "close"}
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without content")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--requests-c16", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    convs = conversations(args.requests, 0)
    warm = conversations(1, 99)[0]  # another seed: caches the system prompt, none of the measured turns
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    with serving(tailserve_cmd(PORT, "--max-num-seqs", "16"), PORT, RESULTS / "server_overhead.log") as url:
        llm = LLM(max_num_seqs=16)
        tok = llm.tokenizer
        ids = [tok.encode(tok.apply_chat_template(c)) for c in convs]
        llm.generate(tok.encode(tok.apply_chat_template(warm)), SamplingParams(max_tokens=2))
        client = httpx.Client(timeout=60)
        http_ttft(client, url, warm, 2)
        local, remote = [], []
        for i, c in enumerate(convs):
            local.append(local_ttft(llm, ids[i], params))
            remote.append(http_ttft(client, url, c, args.output_tokens))
        prompts16 = [tok.encode(tok.apply_chat_template(c)) for c in conversations(args.requests_c16, 0)]
        tok_s_local, tok_s_http = [], []
        for rnd in range(args.rounds):
            t0 = time.perf_counter()
            outs = llm.generate(prompts16, params)
            tok_s_local.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
            out = RESULTS / f"overhead-c16-r{rnd}"
            run = closed_loop(url, out, "chat", 16, args.requests_c16, args.output_tokens, 0, "--warmup", "1")
            tok_s_http.append(run["summary"]["throughput"]["output_tok_per_s"])
    result = {
        "ttft_local_s": local,
        "ttft_http_s": remote,
        "ttft_p50_local": statistics.median(local),
        "ttft_p50_http": statistics.median(remote),
        "ttft_paired_median_diff": statistics.median(h - x for h, x in zip(remote, local, strict=True)),
        "output_tok_s_c16_local": statistics.median(tok_s_local),
        "output_tok_s_c16_http": statistics.median(tok_s_http),
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "server_overhead.json").write_text(json.dumps(result, indent=2))
    print(header("Server overhead", "python benchmarks/server_overhead.py"))
    print("| metric | in-process engine | over HTTP | difference |\n|---|---|---|---|")
    a, b = result["ttft_p50_local"] * 1e3, result["ttft_p50_http"] * 1e3
    print(f"| TTFT p50, concurrency 1 | {a:.1f} ms | {b:.1f} ms | {b - a:+.1f} ms |")
    paired = result["ttft_paired_median_diff"] * 1e3
    print(f"| TTFT, same prompt, median of differences | | | {paired:+.1f} ms |")
    a, b = result["output_tok_s_c16_local"], result["output_tok_s_c16_http"]
    print(f"| output tok/s, concurrency 16 | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
