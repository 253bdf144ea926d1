"""What the grammar costs the engine: decode tok/s with every row constrained vs none at c=1 and c=16,
masked lazily (the default) and eagerly, mask time per step, and the TTFT added by a cold and a warm
schema.

Decode: the default model (fused step) decodes `--tokens` tokens per request; the constrained requests
follow a schema that cannot end before then (an array of at least 200 integers), so both modes run
the same number of steps at the same batch size. Prefill (the first step) is left out of the rate.
Rounds alternate the modes (none, lazy, eager); the figure is the median over rounds. Mask time per
step is read from the engine's own counters (engine/masks.py): what the engine thread spends on masks
(lazy: checking picks and redoing misses; eager: waiting for and applying masks), and what the mask
thread spends filling them (eager only, overlapped with the engine thread's work). The lazy rows'
misses (a full mask needed) are counted per row-step.

TTFT: one request at a time, each with a prompt of its own, from "the request arrives" (the grammar's
compile, if any, is inside) to its first token; modes alternate: no grammar, a warm schema (compiled
before, a cache hit), a cold one (a schema never seen: compiled, first mask included). Run under
`flock /work/bench.lock`.

    python benchmarks/structured_cost.py [--rounds 5] [--tokens 64] [--ttft-samples 30]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from harness import quantile

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.sampling import SamplingParams
from tailserve.structured.grammar import GrammarCompiler, GrammarSpec, Vocabulary

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}


def order_schema(n: int) -> dict:
    """A realistic schema (nested object, enum, array of objects); `n` makes it one never seen."""
    item = {
        "type": "object",
        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
        "required": ["sku", "qty", "price"],
    }
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "status": {"enum": ["open", "paid", "shipped"]},
            "customer": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            "items": {"type": "array", "items": item, "maxItems": 3},
            f"note{n}": {"type": "string"},
        },
        "required": ["id", "status", "customer", "items"],
        "additionalProperties": False,
    }


def decode_rate(
    engine: LLMEngine, grammar, concurrency: int, tokens: int
) -> tuple[float, float, float, int, int]:
    """(decode tok/s, engine-thread ms per step on masks, mask-thread ms per step filling them, lazy
    hits, lazy misses) for one batch of `concurrency` requests."""
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "List 200 numbers as JSON."}])
    for i in range(concurrency):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params, grammar=grammar)
    engine.step()  # prefill and the first token
    st = engine.masks.stats
    before = (
        st.wait_seconds + st.apply_seconds + st.lazy_seconds,
        st.fill_seconds,
        st.lazy_hits,
        st.lazy_misses,
    )
    steps, produced = 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - t0
    on_path = st.wait_seconds + st.apply_seconds + st.lazy_seconds - before[0]
    filling = st.fill_seconds - before[1]
    hits, misses = st.lazy_hits - before[2], st.lazy_misses - before[3]
    return produced / elapsed, 1e3 * on_path / max(steps, 1), 1e3 * filling / max(steps, 1), hits, misses


def ttft(engine: LLMEngine, compiler: GrammarCompiler, spec: GrammarSpec | None, n: int) -> float:
    """Seconds from arrival (compile included) to the first token of one request."""
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Order number {n}: write it as JSON."}]
    )
    t0 = time.perf_counter()
    grammar = compiler.compile(spec) if spec is not None else None
    engine.add_request(f"t{n}", prompt, SamplingParams(max_tokens=2, temperature=0), grammar=grammar)
    first = None
    while engine.has_unfinished():
        outs = engine.step()
        if first is None and any(o.new_token_ids for o in outs):
            first = time.perf_counter() - t0
    assert first is not None
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ttft-samples", type=int, default=30)
    args = ap.parse_args()
    engine = LLMEngine.from_config(EngineConfig(kv_cache_memory=1.0, max_num_seqs=32))
    compiler = GrammarCompiler(Vocabulary.of_tokenizer(engine.tokenizer))
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    decode_rate(engine, None, 1, 8)  # warm up
    t0 = time.perf_counter()
    decode_rate(engine, grammar, 1, 2)
    print(f"first constrained request: {time.perf_counter() - t0:.2f} s")
    for c in (1, 16):
        free: list[float] = []
        runs: dict[bool, list[tuple[float, float, float, int, int]]] = {True: [], False: []}
        for _ in range(args.rounds):
            free.append(decode_rate(engine, None, c, args.tokens)[0])
            for lazy in (True, False):
                engine.masks.lazy = lazy
                runs[lazy].append(decode_rate(engine, grammar, c, args.tokens))
        engine.masks.lazy = True
        f = statistics.median(free)
        print(f"c={c:<3} decode tok/s unconstrained {f:7.1f}")
        for lazy, rs in runs.items():
            b = statistics.median(r[0] for r in rs)
            hits, misses = sum(r[3] for r in rs), sum(r[4] for r in rs)
            checked = f"  lazy misses {misses}/{hits + misses} row-steps" if lazy else ""
            print(
                f"      {'lazy ' if lazy else 'eager'} constrained {b:7.1f}  ratio {b / f:.3f}  "
                f"mask time (engine thread) {statistics.median(r[1] for r in rs):.2f} ms/step  "
                f"fill (mask thread) {statistics.median(r[2] for r in rs):.2f} ms/step{checked}"
            )
    warm = GrammarSpec.json_schema(order_schema(0))
    compiler.compile(warm)
    fresh = itertools.count(1)
    times: dict[str, list[float]] = {"none": [], "warm": [], "cold": []}
    n = itertools.count()
    for _ in range(args.ttft_samples):
        times["none"].append(ttft(engine, compiler, None, next(n)))
        times["warm"].append(ttft(engine, compiler, warm, next(n)))
        cold = GrammarSpec.json_schema(order_schema(next(fresh)))
        times["cold"].append(ttft(engine, compiler, cold, next(n)))
    base50, base99 = quantile(times["none"], 0.5), quantile(times["none"], 0.99)
    for mode, xs in times.items():
        p50, p99 = quantile(xs, 0.5), quantile(xs, 0.99)
        print(
            f"TTFT {mode:<5} p50 {1e3 * p50:6.1f} ms  p99 {1e3 * p99:6.1f} ms  "
            f"added p50 {1e3 * (p50 - base50):+6.1f} ms  p99 {1e3 * (p99 - base99):+6.1f} ms"
        )
    st = engine.masks.stats
    print(
        f"eager mask rows {st.rows}: prefetched {st.prefetched_rows}, unrestricted (no bias) "
        f"{st.unrestricted_rows}; lazy rows {st.lazy_hits + st.lazy_misses}: misses {st.lazy_misses}"
    )
    compiler.shutdown()


if __name__ == "__main__":
    main()
