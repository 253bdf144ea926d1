"""Config → pools: one `Pool` per public model. A backend URL listed under several models is one
`routing.Backend` (one in-flight count, one breaker) and one connection pool, whatever it is called."""

from __future__ import annotations

import logging

import httpx

from tailserve.gateway.config import GatewayConfig, usable_cpus
from tailserve.gateway.h1client import Client
from tailserve.gateway.spawn import Spawned, cpu_shares
from tailserve.gateway.upstream import Pool, Upstream, api_base, list_models, make_client
from tailserve.routing.backends import Backend
from tailserve.routing.breaker import BreakerConfig
from tailserve.routing.chooser import Chooser

log = logging.getLogger("tailserve.gateway")


def detect_kind(url: str, api_key: str | None = None) -> str:
    """ "tailserve" when the backend's /v1/models says so; "openai" otherwise (or when unreachable)."""
    try:
        cards = list_models(url, timeout=2.0, api_key=api_key)
    except (httpx.HTTPError, ValueError) as e:
        log.warning("%s: cannot list its models (%s); treating it as a plain OpenAI server", url, e)
        return "openai"
    return "tailserve" if any(c.get("owned_by") == "tailserve" for c in cards) else "openai"


def spawn_cpus(config: GatewayConfig) -> list[int]:
    """The CPUs spawned backends share: those this process may use, less the gateway's own `cpus` where
    that leaves any."""
    usable = sorted(usable_cpus())
    rest = [c for c in usable if c not in (config.cpus or [])]
    return rest or usable


def resolve_urls(config: GatewayConfig, spawned: Spawned) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(model, backend index) → [(url, kind)]: spawns the `spawn:` entries (not waiting for them), each
    replica that does not set its own `--num-threads` on a CPU share of its own (spawn.py)."""
    pinned = [
        b.spawn.replicas
        for spec in config.models.values()
        for b in spec.backends
        if b.spawn is not None and not _sets_threads(b.spawn.args)
    ]
    shares = iter(cpu_shares(spawn_cpus(config), sum(pinned)) if pinned else [])
    out: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for name, spec in config.models.items():
        for i, b in enumerate(spec.backends):
            if b.spawn is not None:
                args = list(b.spawn.args)
                if not any(a.startswith("--served-model-name") for a in args):
                    args += ["--served-model-name", b.model or name]  # so it answers to the name we send
                own = _sets_threads(args)
                out[name, i] = [
                    (spawned.start(args, None if own else next(shares)), "tailserve")
                    for _ in range(b.spawn.replicas)
                ]
            else:
                assert b.url is not None
                kind = detect_kind(b.url, b.api_key) if b.kind == "auto" else b.kind
                out[name, i] = [(b.url, kind)]
    return out


def _sets_threads(args: list[str]) -> bool:
    return any(a == "--num-threads" or a.startswith("--num-threads=") for a in args)


def make_pools(config: GatewayConfig, urls: dict[tuple[str, int], list[tuple[str, str]]]) -> dict[str, Pool]:
    breaker = BreakerConfig(**config.breaker.model_dump())
    backends: dict[str, Backend] = {}
    clients: dict[str, Client] = {}
    pools: dict[str, Pool] = {}
    for name, spec in config.models.items():
        if spec.group is not None:  # tiers of other models: no backends of its own
            continue
        ups: dict[str, Upstream] = {}
        for i, b in enumerate(spec.backends):
            for url, kind in urls[name, i]:
                base = api_base(url)
                if base not in backends:
                    backends[base] = Backend.make(base, b.weight, b.max_concurrency, breaker)
                    clients[base] = make_client(b.max_concurrency)
                ups[base] = Upstream(
                    backend=backends[base],
                    base=base,
                    model=b.model or name,
                    kind=kind,
                    connect_timeout=b.connect_timeout,
                    read_timeout=b.read_timeout,
                    client=clients[base],
                    api_key=b.api_key,
                )
        members = [u.backend for u in ups.values()]
        chooser = Chooser(members, config.load_factor, config.policy, config.ttft_slack, config.ttft_ratio)
        pools[name] = Pool(name, ups, chooser, list(spec.fallback))
    return pools
