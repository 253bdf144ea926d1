"""The backends as the gateway reaches them: one connection pool each, the routing state each
one has in `tailserve.routing`, model discovery, and the poll of tailserve backends' own load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

import httpx

from tailserve.gateway.h1client import Client
from tailserve.routing.backends import Backend
from tailserve.routing.chooser import Chooser
from tailserve.routing.load import HEADER as LOAD_HEADER
from tailserve.routing.load import parse_header, parse_json

log = logging.getLogger("tailserve.gateway")

WAITING_METRIC = "tailserve:num_requests_waiting"


def api_base(url: str) -> str:
    """`url` as an OpenAI base URL: ends in /v1 (added when the URL is a bare host)."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def make_client(max_connections: int | None) -> Client:
    """A backend's connection pool (h1client: httpx cost the gateway half its CPU per request); no
    environment proxies (backends are addressed directly)."""
    return Client(max_connections)


@dataclass
class Upstream:
    """One backend: where it is, what it calls the model, and how to talk to it."""

    backend: Backend
    base: str  # the OpenAI base URL, ending in /v1
    model: str  # the model's name on this backend
    kind: str  # "tailserve" (takes the remaining time as `timeout`) or "openai"
    connect_timeout: float
    read_timeout: float
    client: Client
    api_key: str | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def root(self) -> str:
        return self.base.removesuffix("/v1")

    def observe(self, headers: dict[str, str], now: float) -> None:
        """Read the load a tailserve backend publishes on each answer into its routing state."""
        value = headers.get(LOAD_HEADER)
        if value is not None:
            pub = parse_header(value)
            self.backend.report(pub.waiting, pub.ttft, now, pub.running, pub.rate)

    def timeout(self, remaining: float) -> httpx.Timeout:
        """No single wait of an attempt outlasts the request's remaining time."""
        read = min(self.read_timeout, remaining)
        return httpx.Timeout(connect=min(self.connect_timeout, remaining), read=read, write=read, pool=read)


@dataclass
class Pool:
    """A public model: its upstreams, the chooser over them, and where to go when they cannot serve."""

    name: str
    upstreams: dict[str, Upstream]  # by backend name
    chooser: Chooser
    fallback: list[str]


def list_models(url: str, timeout: float = 5.0, api_key: str | None = None) -> list[dict]:
    """A backend's /v1/models entries (blocking: used before serving)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(api_base(url) + "/models", timeout=timeout, headers=headers, trust_env=False)
    r.raise_for_status()
    data = r.json().get("data")
    if not isinstance(data, list):
        raise ValueError(f"{url}: /v1/models has no 'data' list")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def parse_waiting(text: str) -> float | None:
    """The waiting-request gauge of a tailserve /metrics page (summed over its models)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(WAITING_METRIC):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


async def poll_loads(upstreams: list[Upstream], interval: float) -> None:
    """Forever: read each tailserve backend's queue and predicted TTFT (its `/load`; the queue from its
    `/metrics` where it has no `/load`) into its routing state. A backend that cannot be reached
    counts a failure toward its breaker, so a dead one is taken out even while idle."""
    targets = [u for u in upstreams if u.kind == "tailserve"]
    if not targets or interval <= 0:
        return

    async def one(u: Upstream) -> None:
        try:
            r = await u.client.get(u.root + "/load", timeout=min(1.0, interval))
            if r.status_code == 404:
                r = await u.client.get(u.root + "/metrics", timeout=min(1.0, interval))
                if r.status_code == 200:
                    u.backend.report(waiting=parse_waiting(r.text))
                return
        except httpx.HTTPError:
            u.backend.breaker.on_failure(time.monotonic())
            return
        if r.status_code == 200:
            with contextlib.suppress(ValueError):
                pub = parse_json(json.loads(r.content))
                u.backend.report(pub.waiting, pub.ttft, time.monotonic(), pub.running, pub.rate)

    while True:
        await asyncio.gather(*(one(u) for u in targets))
        await asyncio.sleep(interval)
