"""Prefix caching, multi-turn reuse and length-aware scheduling, measured with `tailserve bench`.

1. chat, concurrency 8: TTFT with the prefix cache vs `--no-prefix-cache`.
2. multiturn, concurrency 4: TTFT of later turns vs first turns (history reuse), cache on and off.
3. straggler, concurrency 8: short requests' p99 TTFT with 2k-token prompts mixed in, under
   length-aware lanes vs chunking off + FCFS, and vs the same short requests with no long prompts
   (alternated rounds, requests pooled).
4. partial: prompt tokens computed for chat waves and multiturn sessions, in-process, with the prefix
   cache's partial-block hits and without (full blocks only): counts, not times, so one run says it.

    .venv/bin/python benchmarks/prefix_and_lanes.py [--parts chat,multiturn,straggler,partial]
"""

from __future__ import annotations

import argparse
import json
import statistics

from harness import RECORDED, RESULTS, bench, header, serving, serving_all, tailserve_cmd

PORT = 8120
COMMON: list[str] = []  # --server-args: flags for every server


def run(label: str, server_flags: list[str], bench_flags: list[str]) -> dict:
    with serving(tailserve_cmd(PORT, *COMMON, *server_flags), PORT, RESULTS / f"{label}.log") as url:
        return bench(url, RESULTS / label, "--seed", "0", "--no-plots", *bench_flags)


def ttft(run_: dict, q: str) -> float:
    return run_["summary"]["latency"]["ttft_s"][q] * 1e3


def short_ttft(requests: list[dict], q: float) -> float:
    """p-quantile TTFT (ms) of the normal (short) requests only."""
    xs = sorted(r["ttft_s"] for r in requests if r["status"] == "ok" and r["tag"] == "normal")
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1e3


def chat() -> list[str]:
    common = ["--workload", "chat", "--concurrency", "8", "--requests", "48", "--output-tokens", "32"]
    on = run("prefix-on", [], common)
    off = run("prefix-off", ["--no-prefix-cache"], common)
    return [
        "| chat c=8 | TTFT p50 | TTFT p99 | out tok/s |",
        "|---|---|---|---|",
        f"| prefix cache on | {ttft(on, 'p50'):.0f} ms | {ttft(on, 'p99'):.0f} ms | "
        f"{on['summary']['throughput']['output_tok_per_s']:.0f} |",
        f"| `--no-prefix-cache` | {ttft(off, 'p50'):.0f} ms | {ttft(off, 'p99'):.0f} ms | "
        f"{off['summary']['throughput']['output_tok_per_s']:.0f} |",
        f"| ratio off/on | {ttft(off, 'p50') / ttft(on, 'p50'):.1f}x "
        f"| {ttft(off, 'p99') / ttft(on, 'p99'):.1f}x | |",
    ]


def multiturn() -> list[str]:
    common = ["--workload", "multiturn", "--concurrency", "4", "--requests", "40", "--output-tokens", "48"]
    rows = ["| multiturn c=4 | turn | n | prompt tokens (mean) | TTFT p50 |", "|---|---|---|---|---|"]
    for label, flags in (("cache on", []), ("cache off", ["--no-prefix-cache"])):
        r = run(f"multiturn-{label.replace(' ', '-')}", flags, common)
        by_turn: dict[int, list[dict]] = {}
        for q in r["requests"]:
            if q["status"] == "ok":
                by_turn.setdefault(min(q["turn"], 4), []).append(q)
        for turn, qs in sorted(by_turn.items()):
            p = statistics.mean(q["prompt_tokens"] or 0 for q in qs)
            t = statistics.median(q["ttft_s"] for q in qs) * 1e3
            rows.append(
                f"| {label} | {turn + 1}{'+' if turn == 4 else ''} | {len(qs)} | {p:.0f} | {t:.0f} ms |"
            )
    return rows


def straggler(rounds: int) -> list[str]:
    """A server per setting, all up at once, the runs alternated round by round (seed = round), and each
    setting's short requests pooled over the rounds: a p99 over ~45 requests is nearly their maximum,
    which one noisy second on this machine decides."""
    common = ["--workload", "straggler", "--concurrency", "8", "--requests", "50", "--output-tokens", "32"]
    # One server per setting: a run must not find the previous setting's prompts (same seed) cached.
    servers = {
        "lanes": tailserve_cmd(None, *COMMON),
        "fcfs": tailserve_cmd(None, *COMMON, "--no-chunked-prefill", "--no-length-aware"),
        "none": tailserve_cmd(None, *COMMON),
    }
    settings = {  # label → (server, extra bench flags)
        "lanes + chunked (default)": ("lanes", []),
        "chunking off, FCFS": ("fcfs", []),
        "no long prompts": ("none", ["--straggler-every", "0"]),
    }
    pooled: dict[str, list[dict]] = {label: [] for label in settings}
    with serving_all(servers, PORT, RESULTS / "straggler") as urls:
        for rnd in range(rounds):
            for label, (server, flags) in settings.items():
                out = RESULTS / f"straggler-{server}-r{rnd}"
                run = bench(urls[server], out, "--seed", str(rnd), "--no-plots", *common, *flags)
                pooled[label] += run["requests"]
    n = sum(1 for r in pooled["no long prompts"] if r["status"] == "ok")
    rows = [
        f"| straggler c=8, {rounds} rounds pooled | short TTFT p50 | short TTFT p99 | long TTFT p50 |",
        "|---|---|---|---|",
    ]
    for label, reqs in pooled.items():
        longs = [q["ttft_s"] for q in reqs if q["status"] == "ok" and q["tag"] == "long"]
        lt = f"{statistics.median(longs) * 1e3:.0f} ms" if longs else "-"
        rows.append(f"| {label} | {short_ttft(reqs, 0.5):.0f} ms | {short_ttft(reqs, 0.99):.0f} ms | {lt} |")
    lanes, fcfs, alone = (short_ttft(pooled[label], 0.99) for label in settings)
    rows.append(f"| lanes / FCFS p99 | | {lanes / fcfs:.2f}x | |")
    rows.append(f"| lanes / no-long p99 | | {lanes / alone:.2f}x | |")
    rows.append(f"\n({n} short requests per setting.)")
    return rows


def partial() -> list[str]:
    from tailserve.bench.workloads import build_workload
    from tailserve.llm import LLM
    from tailserve.sampling import SamplingParams

    llm = LLM()
    bm = llm.engine.block_manager
    params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0)
    chat_wl = build_workload("chat", 33, 1)
    turns_wl = build_workload("multiturn", 40, 1)

    def chat_waves() -> tuple[int, int]:
        """A cached system prompt, then 4 waves of 8 requests at once."""
        msgs = [[{"role": "system", "content": s.system}, {"role": "user", "content": s.turns[0].user}]
                for s in chat_wl.sessions]  # fmt: skip
        llm.chat(msgs[0], params)
        outs = [o for w in range(4) for o in llm.chat(msgs[1 + 8 * w : 9 + 8 * w], params)]
        return sum(len(o.prompt_token_ids) for o in outs), sum(o.num_cached_tokens for o in outs)

    def sessions() -> tuple[int, int]:
        """Each session's turns in order, every turn re-sending the history with the model's replies."""
        total = cached = 0
        for sess in turns_wl.sessions:
            conv = [{"role": "system", "content": sess.system}]
            for turn in sess.turns:
                conv.append({"role": "user", "content": turn.user})
                out = llm.chat(conv, params)[0]
                conv.append({"role": "assistant", "content": out.text})
                total, cached = total + len(out.prompt_token_ids), cached + out.num_cached_tokens
        return total, cached

    least = bm.min_partial_tokens
    rows = [
        "| workload (prompt tokens) | computed, full blocks only | computed, with partial hits | ratio |",
        "|---|---|---|---|",
    ]
    for name, replay in (("chat: 4 waves of 8", chat_waves), ("multiturn: 40 turns", sessions)):
        computed = []
        for least_tokens in (bm.block_size, least):  # a block's every token: no partial hit can qualify
            bm.reset_prefix_cache()
            bm.min_partial_tokens = least_tokens
            total, cached = replay()
            computed.append(total - cached)
        off, on = computed
        rows.append(f"| {name} ({total}) | {off} | {on} | {on / off:.2f}x |")
    bm.min_partial_tokens = least
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="chat,multiturn,straggler,partial")
    ap.add_argument("--server-args", default="", help="extra flags for every tailserve serve")
    ap.add_argument("--rounds", type=int, default=3, help="straggler: alternated rounds pooled")
    args = ap.parse_args()
    COMMON.extend(args.server_args.split())
    parts = {
        "chat": chat,
        "multiturn": multiturn,
        "straggler": lambda: straggler(args.rounds),
        "partial": partial,
    }
    tables = {name: parts[name]() for name in args.parts.split(",")}
    RECORDED.mkdir(parents=True, exist_ok=True)
    recorded = RECORDED / "prefix_and_lanes.json"
    kept = json.loads(recorded.read_text()) if recorded.exists() else {}
    recorded.write_text(json.dumps({**kept, **tables}, indent=2))  # the parts not run keep their figures
    print(header("Prefix caching and length-aware scheduling", "python benchmarks/prefix_and_lanes.py"))
    for rows in tables.values():
        print("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
