"""The comparison benchmarks' design (benchmarks/harness.py): orders that balance the endpoints'
places, and an added-latency interval that covers what it should."""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from collections import Counter
from pathlib import Path

# Loaded from its file, not by putting benchmarks/ on sys.path: its kernels.py would shadow the
# `kernels` package that transformers imports, for every test after this one.
_path = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
_spec = importlib.util.spec_from_file_location("bench_harness", _path)
assert _spec is not None and _spec.loader is not None
harness = sys.modules["bench_harness"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(harness)
added_interval, round_order = harness.added_interval, harness.round_order


def test_every_endpoint_takes_every_place_and_follows_every_other_equally_often() -> None:
    for names in (["d", "g"], ["d", "g", "l"]):
        rounds = [round_order(names, r) for r in range(2 * len(names) * (len(names) - 1))]
        places = Counter((n, order.index(n)) for order in rounds for n in order)
        assert len(set(places.values())) == 1 and len(places) == len(names) ** 2
        follows = Counter(pair for order in rounds for pair in itertools.pairwise(order))
        assert len(set(follows.values())) == 1 and len(follows) == len(names) * (len(names) - 1)
    rotations = [round_order(list("abcd"), r) for r in range(4)]
    assert Counter((n, o.index(n)) for o in rotations for n in o) == Counter(
        {(n, i): 1 for n in "abcd" for i in range(4)}
    )


def test_the_interval_covers_a_known_shift_and_excludes_it_when_there_is_none() -> None:
    rng = random.Random(1)
    base = [[rng.gauss(50, 5) for _ in range(64)] for _ in range(12)]
    shifted = [[x + 3 + rng.gauss(0, 5) for x in rnd] for rnd in base]
    same = [[x + rng.gauss(0, 5) for x in rnd] for rnd in base]
    est, low, high = added_interval(base, shifted, 0.5)
    assert low < 3 < high and low > 0 and abs(est - 3) < 2
    est, low, high = added_interval(base, same, 0.5)
    assert low < 0 < high and high < 3
