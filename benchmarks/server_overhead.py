"""What the HTTP server adds: the same chat requests in-process (LLMEngine) and over HTTP (tailserve serve
+ tailserve bench), measured one after the other in one run.

- concurrency 1: p50 TTFT over HTTP vs the engine's in-process time to first token;
- concurrency 16: output tok/s over HTTP vs the offline engine running the same requests 16 at a time.

    .venv/bin/python benchmarks/server_overhead.py [--requests 16] [--requests-c16 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from harness import RECORDED, RESULTS, bench, header, pct, serving, tailserve_cmd
from offline import chat_prompts

from tailserve.llm import LLM
from tailserve.sampling import SamplingParams

PORT = 8110


def in_process(n1: int, n16: int, new: int) -> dict[str, float]:
    llm = LLM(max_num_seqs=16)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    prompts1 = chat_prompts(llm, n1, 0)
    llm.generate(
        prompts1[:1], SamplingParams(max_tokens=2, temperature=0.0)
    )  # warm, like the bench's warm-up
    ttfts = []
    for p in prompts1:
        t0 = time.perf_counter()
        first = None
        for out in llm.stream(p, params):
            if first is None and out.new_token_ids:
                first = time.perf_counter() - t0
        ttfts.append(first)
    prompts16 = chat_prompts(llm, n16, 0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts16, params)
    wall = time.perf_counter() - t0
    return {
        "ttft_p50": statistics.median(ttfts),
        "output_tok_s_c16": sum(len(o.token_ids) for o in outs) / wall,
    }


def over_http(n1: int, n16: int, new: int) -> dict[str, float]:
    with serving(tailserve_cmd(PORT, "--max-num-seqs", "16"), PORT, RESULTS / "server_overhead.log") as url:
        common = [
            "--workload",
            "chat",
            "--output-tokens",
            str(new),
            "--seed",
            "0",
            "--no-plots",
            "--warmup",
            "1",
        ]
        r1 = bench(url, RESULTS / "overhead-c1", *common, "--concurrency", "1", "--requests", str(n1))[
            "runs"
        ][0]
        r16 = bench(url, RESULTS / "overhead-c16", *common, "--concurrency", "16", "--requests", str(n16))
    return {
        "ttft_p50": pct(r1, "ttft_s", "p50"),
        "output_tok_s_c16": r16["runs"][0]["summary"]["throughput"]["output_tok_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--requests-c16", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    args = ap.parse_args()
    local = in_process(args.requests, args.requests_c16, args.output_tokens)
    http = over_http(args.requests, args.requests_c16, args.output_tokens)
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "server_overhead.json").write_text(json.dumps({"in_process": local, "http": http}, indent=2))
    print(header("Server overhead", "python benchmarks/server_overhead.py"))
    print("| metric | in-process engine | over HTTP | difference |\n|---|---|---|---|")
    d = (http["ttft_p50"] - local["ttft_p50"]) * 1e3
    t_local, t_http = local["ttft_p50"] * 1e3, http["ttft_p50"] * 1e3
    print(f"| TTFT p50, concurrency 1 | {t_local:.1f} ms | {t_http:.1f} ms | {d:+.1f} ms |")
    a, b = local["output_tok_s_c16"], http["output_tok_s_c16"]
    print(f"| output tok/s, concurrency 16 | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
