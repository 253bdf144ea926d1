"""Human and machine output of a benchmark: tables, the JSON file, PNG plots, and `compare`.

Everything here works from the result dictionary (the JSON's content), so plots and comparisons
can be redone later from saved files alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from tailserve.bench.stats import PERCENTILES, UNHAPPY_TAGS

SCHEMA = "tailserve-bench/1"
METRICS = (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))


def make_console() -> Console:
    """Rich's console, wide enough for the tables when the output goes to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(d: dict | None, p: str) -> float | None:
    return None if d is None else d.get(p)


def _load_value(run: dict) -> float:
    return next(v for k, v in run["load"].items() if k in ("concurrency", "rate", "burst_size"))


def print_run(console: Console, run: dict) -> None:
    """The latency table, counts, throughput, goodput, buckets and server view of one run."""
    s = run["summary"]
    t = Table(title=f"{run['label']}  ({s['counts']['ok']} ok in {s['wall_s']:.1f} s)", title_justify="left")
    t.add_column("ms")
    for col in ("n", "mean", *(f"p{p}" for p in PERCENTILES)):
        t.add_column(col, justify="right")
    for key, name in METRICS:
        d = s["latency"][key]
        cells = (
            [str(d["n"]), _ms(d["mean"]), *(_ms(d[f"p{p}"]) for p in PERCENTILES)] if d else ["0"] + ["-"] * 5
        )
        t.add_row(name, *cells)
    console.print(t)
    c = s["counts"]
    th = s["throughput"]
    console.print(
        f"requests: {c['sent']} sent, {c['ok']} ok, {c['shed']} shed, {c['failed']} failed, "
        f"{c['disconnected']} disconnected, {c['rejected_as_expected']} rejected as expected, "
        f"{c['cancelled']} cancelled, {c['not_sent']} not sent"
    )
    if s["errors_by_status"]:
        console.print(
            "errors by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_status"].items()))
        )
    console.print(
        f"throughput: {th['req_per_s']:.2f} req/s, {th['output_tok_per_s']:.1f} output tok/s, "
        f"{th['input_tok_per_s']:.1f} input tok/s   (tokens counted by: "
        + ", ".join(f"{k} {v}" for k, v in s["tokens"]["source"].items())
        + ")"
    )
    if s["tokens"]["multi_token_events"]:
        console.print(
            f"note: {s['tokens']['multi_token_events']} requests got several tokens per event: "
            "their ITL is per event"
        )
    g = s["goodput"]
    if g:
        slo = ", ".join(f"{k[:-2]} <= {_ms(v)} ms" for k, v in g["slo"].items() if v is not None)
        console.print(
            f"goodput ({slo}): {g['met']}/{c['measured']} = {g['share']:.1%}, {g['req_per_s']:.2f} req/s"
        )
    if len(s["by_prompt_len"]) > 1 or len(s["by_tag"]) > 1:
        bt = Table(title="by prompt length (tokens) and by tag", title_justify="left")
        for col in ("group", "n", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "E2E p99"):
            bt.add_column(col, justify="right")
        groups = [(f"len {k}", v) for k, v in s["by_prompt_len"].items()]
        groups += [(f"tag {k}" + (" *" if k in UNHAPPY_TAGS else ""), v) for k, v in s["by_tag"].items()]
        for name, v in groups:
            bt.add_row(
                name,
                str(v["n"]),
                _ms(_pct(v["ttft_s"], "p50")),
                _ms(_pct(v["ttft_s"], "p99")),
                _ms(_pct(v["tpot_s"], "p50")),
                _ms(_pct(v["tpot_s"], "p99")),
                _ms(_pct(v["e2e_s"], "p99")),
            )
        console.print(bt)
    sv = run.get("server")
    if sv:
        console.print(
            f"server view ({' '.join(sv['metric_prefixes']) or 'metrics'}): "
            f"TTFT mean {_ms(sv['ttft_mean_s'])} ms, "
            f"p50 ~{_ms(sv['ttft_p50_s'])} ms (client mean {_ms(sv['client_ttft_mean_s'])} ms); "
            f"prefix-cache hit rate {_num(sv['prefix_cache_hit_rate'], '.1%')}; "
            f"spec-decode acceptance {_num(sv['spec_decode_acceptance_rate'], '.1%')}"
        )
        if sv["ttft_disagrees"]:
            console.print(
                f"[bold yellow]warning:[/] server and client TTFT disagree by {sv['ttft_disagreement']:+.0%} "
                "(client minus server, over client): time outside the server's clock"
            )


def print_sweep(console: Console, result: dict) -> None:
    t = Table(title="capacity curve (latencies in ms)", title_justify="left")
    unit = result["runs"][0]["label"].split("=")[0]
    cols = (unit, "ok", "shed", "failed", "req/s", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
    for col in (*cols, "E2E p99", "goodput"):
        t.add_column(col, justify="right")
    for run in result["runs"]:
        s = run["summary"]
        lat = s["latency"]
        g = s["goodput"]
        t.add_row(
            f"{_load_value(run):g}",
            str(s["counts"]["ok"]),
            str(s["counts"]["shed"]),
            str(s["counts"]["failed"]),
            f"{s['throughput']['req_per_s']:.2f}",
            f"{s['throughput']['output_tok_per_s']:.1f}",
            _ms(_pct(lat["ttft_s"], "p50")),
            _ms(_pct(lat["ttft_s"], "p99")),
            _ms(_pct(lat["tpot_s"], "p50")),
            _ms(_pct(lat["tpot_s"], "p99")),
            _ms(_pct(lat["e2e_s"], "p99")),
            "-" if g is None else f"{g['share']:.1%}",
        )
    console.print(t)
    cap = result.get("capacity")
    if cap:
        best = cap["max_load_meeting_slo"]
        console.print(
            f"highest load meeting the SLO for {cap['attainment']:.0%} of requests: "
            + ("none of those tried" if best is None else f"{best:g}")
        )


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def _measured_values(run: dict, key: str) -> list[float]:
    reqs = [r for r in run["requests"] if r["status"] == "ok" and r["tag"] not in UNHAPPY_TAGS]
    if key == "itl_s":
        return sorted(g for r in reqs for g in r["itl_s"])
    return sorted(r[key] for r in reqs if r[key] is not None)


def plot_cdfs(result: dict, path: Path) -> None:
    """Latency CDFs (TTFT, ITL, TPOT, E2E), one line per load point."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    slo = result["config"].get("slo") or {}
    for ax, (key, name) in zip(axes.flat, METRICS, strict=True):
        for run in result["runs"]:
            xs = [x * 1e3 for x in _measured_values(run, key)]
            if xs:
                ax.plot(
                    xs,
                    [(i + 1) / len(xs) for i in range(len(xs))],
                    label=run["label"],
                    drawstyle="steps-post",
                )
        if slo.get(key) is not None:
            ax.axvline(slo[key] * 1e3, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl_s" else "fraction of gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_load_curves(result: dict, path: Path) -> None:
    """Percentiles of each latency and the throughput/goodput against the load (a sweep)."""
    plt = _pyplot()
    runs = sorted(result["runs"], key=_load_value)
    loads = [_load_value(r) for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    slo = result["config"].get("slo") or {}
    unit = runs[0]["label"].split("=")[0]
    for ax in axes.flat:
        ax.set_xlabel(f"{runs[0]['load']['mode']} load: {unit}")
        if loads[0] > 0 and loads[-1] / loads[0] >= 4:  # doubling ladders read best on a log axis
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax, (key, name) in zip(axes.flat, (METRICS[0], METRICS[2], METRICS[3]), strict=False):
        for p in ("p50", "p90", "p99"):
            ys = [_pct(r["summary"]["latency"][key], p) for r in runs]
            ax.plot(loads, [None if y is None else y * 1e3 for y in ys], marker="o", label=p)
        if slo.get(key) is not None:
            ax.axhline(slo[key] * 1e3, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_ylabel(f"{name} (ms)")
        ax.legend(fontsize=7)
    ax = axes.flat[3]
    ax.plot(loads, [r["summary"]["throughput"]["req_per_s"] for r in runs], marker="o", label="req/s")
    if all(r["summary"]["goodput"] for r in runs):
        ax.plot(
            loads, [r["summary"]["goodput"]["req_per_s"] for r in runs], marker="o", label="goodput req/s"
        )
    ax.set_ylabel("requests / s")
    ax.legend(fontsize=7)
    fig.suptitle(_title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _title(result: dict) -> str:
    c = result["config"]
    return f"{c['workload']} on {c['model']} at {c['url']} ({c['endpoint']})"


def _pyplot() -> ModuleType:
    """matplotlib (Agg) is imported only when a plot is drawn: it is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(result: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """bench.json, latency_cdf.png and, for sweeps, load_curves.png under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json"]
    write_json(result, paths[0])
    if plots:
        paths.append(out_dir / "latency_cdf.png")
        plot_cdfs(result, paths[-1])
        if len(result["runs"]) > 1:
            paths.append(out_dir / "load_curves.png")
            plot_load_curves(result, paths[-1])
    return paths


COMPARE_ROWS: tuple[tuple[str, str, str], ...] = (  # (name, path in the summary, format)
    *(
        (f"{name} {p} (ms)", f"latency.{key}.{p}", "ms")
        for key, name in METRICS
        for p in ("mean", "p50", "p90", "p99")
    ),
    ("req/s", "throughput.req_per_s", ".2f"),
    ("output tok/s", "throughput.output_tok_per_s", ".1f"),
    ("goodput share", "goodput.share", ".1%"),
    ("ok", "counts.ok", "d"),
    ("shed", "counts.shed", "d"),
    ("failed", "counts.failed", "d"),
)


def _get(d: dict | None, dotted: str) -> float | None:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d if isinstance(d, (int, float)) else None


def _pairs(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """Runs paired by load value where both have it, else by position."""
    by_load = {_load_value(r): r for r in b["runs"]}
    pairs = [(r, by_load[_load_value(r)]) for r in a["runs"] if _load_value(r) in by_load]
    return pairs or list(zip(a["runs"], b["runs"], strict=False))


def compare(paths: Sequence[Path], console: Console) -> int:
    """Print two saved runs side by side with B/A ratios (latency ratios < 1 mean B is faster)."""
    a, b = (json.loads(Path(p).read_text()) for p in paths)
    for res in (a, b):
        if res.get("schema") != SCHEMA:
            console.print(f"[red]not a tailserve bench result: {res.get('schema')!r}[/]")
            return 2
    console.print(f"A: {paths[0]}  {_title(a)}\nB: {paths[1]}  {_title(b)}")
    for ra, rb in _pairs(a, b):
        t = Table(title=f"A {ra['label']}  vs  B {rb['label']}", title_justify="left")
        for col in ("metric", "A", "B", "B/A"):
            t.add_column(col, justify="right")
        for name, dotted, fmt in COMPARE_ROWS:
            va, vb = _get(ra["summary"], dotted), _get(rb["summary"], dotted)
            if va is None and vb is None:
                continue
            fa, fb = ((_ms(v) if fmt == "ms" else _num(v, fmt)) for v in (va, vb))
            ratio = "-" if va is None or vb is None or va == 0 else f"{vb / va:.2f}x"
            t.add_row(name, fa, fb, ratio)
        console.print(t)
    return 0
