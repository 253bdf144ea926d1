"""Speculative decoding measured with `tailserve bench`: speculation off vs ngram vs draft, on the
`copy` workload (the output quotes the prompt) and the `chat` workload, single stream and
concurrency 8, adaptive back-off on. One server per setting, all up at once; the runs alternate
between them round by round and each figure is the median over rounds.

Decode speed is per stream: 1 / TPOT (TPOT = (e2e - TTFT) / (output tokens - 1)), median over
requests; throughput is output tok/s over the run.

    .venv/bin/python benchmarks/speculative.py [--workloads copy,chat] [--concurrency 1,8]

A bf16 target with its own int4 checkpoint as the draft (a cheaper copy of the target):

    .venv/bin/python benchmarks/speculative.py --settings off,draft --json speculative_int4_draft.json \
        --server-args "--quantization none --draft-model smollm2-135m-instruct"
"""

from __future__ import annotations

import argparse
import json
import statistics

from harness import RECORDED, RESULTS, closed_loop, header, serving_all, tailserve_cmd

PORT = 8130
SETTINGS = {
    "off": [],
    "ngram": ["--speculative", "ngram"],
    "draft": ["--speculative", "draft"],
}


def decode_tok_s(run: dict) -> float:
    tpots = [r["tpot_s"] for r in run["requests"] if r["status"] == "ok" and r.get("tpot_s")]
    return 1.0 / statistics.median(tpots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="copy,chat")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--settings", default="off,ngram,draft")
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--server-args", default="", help="extra flags for every tailserve serve")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="speculative.json", help="summary file under benchmarks/recorded")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = args.settings.split(",")
    servers = {s: tailserve_cmd(None, *SETTINGS[s], *args.server_args.split()) for s in settings}
    samples: dict[tuple[str, str, int], list[dict]] = {}
    with serving_all(servers, PORT, RESULTS / "spec") as urls:
        for rnd in range(args.rounds):
            for workload in args.workloads.split(","):
                for c in levels:
                    for setting in settings:
                        n = max(8, args.requests_per_stream * c)
                        out = RESULTS / f"spec-{setting}-{workload}-c{c}-r{rnd}"
                        run = closed_loop(urls[setting], out, workload, c, n, args.output_tokens, rnd)
                        r = {
                            "decode_tok_s": decode_tok_s(run),
                            "output_tok_s": run["summary"]["throughput"]["output_tok_per_s"],
                            "ttft_p50": run["summary"]["latency"]["ttft_s"]["p50"],
                            "acceptance": (run.get("server") or {}).get("spec_decode_acceptance_rate"),
                        }
                        samples.setdefault((workload, setting, c), []).append(r)
                        print(workload, setting, c, rnd, r, flush=True)
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for (workload, setting, c), rs in samples.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "output_tok_s", "ttft_p50")}
        acc = [r["acceptance"] for r in rs if r["acceptance"] is not None]
        med["acceptance"] = statistics.median(acc) if acc else None
        results.setdefault(workload, {}).setdefault(setting, {})[c] = med
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / args.json).write_text(json.dumps(results, indent=2))
    print(header("Speculative decoding", "python benchmarks/speculative.py"))
    print("| workload | conc | setting | decode tok/s/stream | ×off | out tok/s | ×off | TTFT p50 | acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload, by_setting in results.items():
        for c in levels:
            base = by_setting.get("off", {}).get(c)
            for setting, rows in by_setting.items():
                r = rows[c]
                d = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
                t = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else "-"
                acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
                print(
                    f"| {workload} | {c} | {setting} | {r['decode_tok_s']:.0f} | {d} | "
                    f"{r['output_tok_s']:.0f} | {t} | {r['ttft_p50'] * 1e3:.0f} ms | {acc} |"
                )


if __name__ == "__main__":
    main()
