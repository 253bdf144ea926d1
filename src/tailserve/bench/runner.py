"""Drive a workload against a server: closed loop, Poisson arrivals or bursts, always bounded.

Closed loop: C workers, each sends its next session as soon as the previous one finished.
Open loop: sessions arrive at precomputed (seeded) times whether or not the server keeps up:
Poisson with a rate, or bursts of B sessions every `burst_interval` seconds (idle first). The
duration cap cancels whatever is still in flight, so the tool always stops by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from tailserve.bench.client import ClientConfig, RequestRecord, send
from tailserve.bench.http import StreamClient
from tailserve.bench.workloads import Session, Workload, est_tokens

SLOW_READER_RCVBUF = 4096  # bytes; small, so a slow reader pushes back on the server sooner


@dataclass(frozen=True)
class Load:
    """How requests arrive. `value` is the concurrency, the rate (sessions/s) or the burst size."""

    mode: str  # closed | poisson | burst
    value: float
    burst_interval: float = 5.0

    @property
    def unit(self) -> str:
        return {"closed": "concurrency", "poisson": "rate", "burst": "burst_size"}[self.mode]

    def label(self) -> str:
        return f"{self.unit}={self.value:g}"

    def to_json(self) -> dict[str, float | str]:
        d: dict[str, float | str] = {"mode": self.mode, self.unit: self.value}
        if self.mode == "burst":
            d["burst_interval_s"] = self.burst_interval
        return d


@dataclass
class RunResult:
    load: Load
    records: list[RequestRecord]
    t0: float  # perf_counter at the start of the run
    wall_s: float  # from the start to the last request's end
    hit_duration_cap: bool


def arrival_times(load: Load, n: int, seed: int) -> list[float]:
    """Seconds after the start at which each of `n` sessions arrives (open loop only)."""
    if load.mode == "poisson":
        rng = random.Random(f"arrivals:{seed}")
        return list(itertools.accumulate(rng.expovariate(load.value) for _ in range(n)))
    size = max(1, int(load.value))
    return [(i // size + 1) * load.burst_interval for i in range(n)]


class Runner:
    """Owns the HTTP clients for a benchmark; `run` may be called once per load point."""

    def __init__(self, cfg: ClientConfig, on_done: Callable[[RequestRecord], None] | None = None) -> None:
        self.cfg = cfg
        self.on_done = on_done
        self.client = StreamClient(cfg.base_url, cfg.keep_alive)
        self.slow_client = StreamClient(cfg.base_url, cfg.keep_alive, rcvbuf=SLOW_READER_RCVBUF)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.slow_client.aclose()

    async def run(self, workload: Workload, load: Load, duration: float, seed: int = 0) -> RunResult:
        """Send the whole workload under `load`, stopping at `duration` seconds whatever is left."""
        records: list[RequestRecord] = []
        first_ids = [0, *itertools.accumulate(len(s.turns) for s in workload.sessions)]
        jobs = [
            (lambda i=i, s=s: self._session(i, s, first_ids[i], records))
            for i, s in enumerate(workload.sessions)
        ]
        t0 = time.perf_counter()
        capped = False
        try:
            if load.mode == "closed":
                await asyncio.wait_for(_closed_loop(jobs, int(load.value)), duration)
            else:
                await asyncio.wait_for(_open_loop(jobs, arrival_times(load, len(jobs), seed), t0), duration)
        except asyncio.TimeoutError:
            capped = True
        for rec in records:
            if rec.status in ("pending", "cancelled"):
                rec.status, rec.end = "cancelled", None
        ends = [r.end for r in records if r.end is not None]
        wall = (max(ends) if ends else time.perf_counter()) - t0
        records.sort(key=lambda r: r.id)
        return RunResult(load, records, t0, wall, capped)

    async def _session(self, index: int, session: Session, first_id: int, out: list[RequestRecord]) -> None:
        """Send a session's turns in order, each with the history so far (real replies included)."""
        history = [{"role": "system", "content": session.system}] if session.system else []
        history += session.history
        for k, turn in enumerate(session.turns):
            messages = [*history, {"role": "user", "content": turn.user}]
            approx = sum(est_tokens(m["content"]) for m in messages)
            rec = RequestRecord(first_id + k, index, k, turn.tag, approx, turn.max_tokens)
            out.append(rec)
            client = self.slow_client if turn.slow_read else self.client
            await send(client, self.cfg, rec, messages, turn.disconnect_after, turn.slow_read)
            if self.on_done is not None:
                self.on_done(rec)
            history = [*messages, {"role": "assistant", "content": rec.text}]


async def _closed_loop(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    it = iter(jobs)

    async def worker() -> None:
        for job in it:  # the shared iterator hands each job to exactly one worker
            await job()

    await _all([asyncio.ensure_future(worker()) for _ in range(max(1, concurrency))])


async def _open_loop(jobs: list[Callable[[], Awaitable[None]]], at: list[float], t0: float) -> None:
    tasks: list[asyncio.Future[None]] = []
    try:
        for job, t in zip(jobs, at, strict=True):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(job()))
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _all(tasks: list[asyncio.Future[None]]) -> None:
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Future[None]]) -> None:
    """Cancel what is still running and wait for it, so every record is final when we return."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def discover(base_url: str, api_key: str | None) -> dict | None:
    """GET /v1/models: the first model's card (its id, and the context length where given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as c:
        resp = await c.get(base_url + "/v1/models", headers=headers)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    return data[0] if data else None


def context_len_of(card: dict) -> int | None:
    """The context length a model card reports: vLLM's max_model_len, llama.cpp's meta.n_ctx_train."""
    for key in ("max_model_len", "context_length", "max_context_length"):
        if isinstance(card.get(key), int):
            return card[key]
    meta = card.get("meta") or {}
    return meta.get("n_ctx") or meta.get("n_ctx_train")
