"""What the grammar costs the engine: decode tok/s with every row constrained vs none, at c=1 and c=16.

The default model (fused step) decodes `--tokens` tokens per request; the constrained requests follow
a schema that cannot end before then (an array of at least 200 integers), so both modes run the same
number of steps at the same batch size. Prefill (the first step) is left out of the rate. Rounds
alternate the modes; the figure is the median over rounds. Run under `flock /work/bench.lock`.

    python benchmarks/structured_cost.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.sampling import SamplingParams
from tailserve.structured.grammar import GrammarCompiler, GrammarSpec, Vocabulary

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}


def decode_rate(engine: LLMEngine, grammar, concurrency: int, tokens: int) -> tuple[float, float]:
    """(decode tok/s, mean ms per step waiting for and applying masks) for one batch of `concurrency`
    requests; the masks are filled on the mask thread while the model runs."""
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "List 200 numbers as JSON."}])
    for i in range(concurrency):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params, grammar=grammar)
    engine.step()  # prefill and the first token
    masked = 0.0
    constrain = engine._constrain

    def timed(*args) -> None:
        nonlocal masked
        t = time.perf_counter()
        constrain(*args)
        masked += time.perf_counter() - t

    engine._constrain = timed
    steps, produced = 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - t0
    del engine._constrain
    return produced / elapsed, 1e3 * masked / max(steps, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    engine = LLMEngine.from_config(EngineConfig(kv_cache_memory=1.0, max_num_seqs=32))
    compiler = GrammarCompiler(Vocabulary.of_tokenizer(engine.tokenizer))
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    decode_rate(engine, None, 1, 8)  # warm up
    t0 = time.perf_counter()
    decode_rate(engine, grammar, 1, 2)
    print(f"first constrained request: {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    decode_rate(engine, compiler.compile(GrammarSpec.json_schema({**SCHEMA, "minItems": 201})), 1, 2)
    print(f"a second schema's first request: {time.perf_counter() - t0:.2f} s")
    for c in (1, 16):
        free, bound, mask_ms = [], [], []
        for _ in range(args.rounds):
            free.append(decode_rate(engine, None, c, args.tokens)[0])
            rate, ms = decode_rate(engine, grammar, c, args.tokens)
            bound.append(rate)
            mask_ms.append(ms)
        f, b = statistics.median(free), statistics.median(bound)
        print(
            f"c={c:<3} decode tok/s unconstrained {f:7.1f}  constrained {b:7.1f}  ratio {b / f:.3f}  "
            f"mask+apply {statistics.median(mask_ms):.2f} ms/step"
        )
    compiler.shutdown()


if __name__ == "__main__":
    main()
