"""Injected faults, for benchmarks and tests of what sits in front of a server (the gateway's hedging):
`--stall-share P --stall-seconds S` holds a share P of requests for S seconds before they reach the
engine, the way a slow replica (a GC pause, a noisy neighbour) delays some first tokens. Off by default.
"""

from __future__ import annotations

import asyncio
import random


class Stall:
    def __init__(self, share: float, seconds: float, seed: int = 0) -> None:
        if not 0.0 <= share <= 1.0 or seconds < 0:
            raise ValueError(f"stall: share must be in [0, 1] and seconds >= 0, got {share}, {seconds}")
        self.share = share
        self.seconds = seconds
        self._rng = random.Random(seed)  # seeded: a benchmark's stalls are the same run to run

    async def maybe(self) -> None:
        if self.share and self.seconds and self._rng.random() < self.share:
            await asyncio.sleep(self.seconds)
