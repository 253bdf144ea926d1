"""The injected stall holds the configured share of requests, seeded."""

from __future__ import annotations

import asyncio
import time

import pytest

from tailserve.server.faults import Stall


def test_stall_holds_a_share_of_requests() -> None:
    stall = Stall(share=0.25, seconds=0.01, seed=1)

    async def held() -> int:
        count = 0
        for _ in range(200):
            start = time.monotonic()
            await stall.maybe()
            count += time.monotonic() - start >= 0.01
        return count

    assert 30 <= asyncio.run(held()) <= 70
    with pytest.raises(ValueError, match="share"):
        Stall(share=1.5, seconds=1.0)
