"""The gateway's configuration: public models, each with its backends and an optional fallback chain.

```yaml
deadline: 60                    # seconds a request may take, all attempts together (body `timeout` wins)
models:
  chat:
    backends:
      - url: http://10.0.0.5:8000/v1     # any OpenAI-compatible server
        model: smollm2-135m-instruct     # its name there (default: the public name)
        weight: 2
        max_concurrency: 64
        connect_timeout: 1
        read_timeout: 30                 # longest wait for a byte (headers, or the next chunk)
      - spawn: {replicas: 2, args: ["--model", "smollm2-135m-instruct"]}   # local `tailserve serve`
    fallback: [chat-small]
  chat-small:
    backends: [{url: http://10.0.0.6:8080}]
    hedge: {max_share: 0.05}             # latency policies: see gateway/policy_config.py
retry: {max_attempts: 3, backoff_base: 0.025, backoff_cap: 1.0, budget_ratio: 0.2, budget_min: 10}
breaker: {failures: 5, window: 10, open_for: 5, probes: 1, successes: 2}
cpus: [1]                       # pin the gateway to these CPUs (default: wherever the OS puts it)
```

A bad file is refused before anything is served, with the dotted path of the offending key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tailserve.gateway.policy_config import GroupSpec, HedgeSpec


def usable_cpus() -> set[int]:
    """The CPUs this process may be scheduled on (all of them where the OS cannot say)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def check_cpus(cpus: list[int], where: str) -> None:
    """A ConfigError naming the first of `cpus` this process may not run on."""
    allowed = usable_cpus()
    for i, cpu in enumerate(cpus):
        if cpu not in allowed:
            raise ConfigError(f"{where}[{i}]: CPU {cpu} is not one this process may run on {sorted(allowed)}")


class ConfigError(ValueError):
    """The configuration cannot be served; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpawnSpec(_Strict):
    replicas: int = Field(1, ge=1)
    args: list[str] = Field(default_factory=list)  # extra `tailserve serve` flags
    startup_timeout: float = Field(300.0, gt=0)


class BackendSpec(_Strict):
    url: str | None = None
    spawn: SpawnSpec | None = None
    model: str | None = None  # the model's name on this backend (default: the public name)
    kind: Literal["auto", "tailserve", "openai"] = "auto"  # tailserve backends get the remaining `timeout`
    weight: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    connect_timeout: float = Field(2.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    api_key: str | None = None  # sent upstream as a bearer token; the client's own key never is

    @model_validator(mode="after")
    def _one_source(self) -> BackendSpec:
        if (self.url is None) == (self.spawn is None):
            raise ValueError("give exactly one of 'url' or 'spawn'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class ModelSpec(_Strict):
    backends: list[BackendSpec] = Field(default_factory=list)
    fallback: list[str] = Field(default_factory=list)
    hedge: HedgeSpec | None = None
    group: GroupSpec | None = None  # tiers behind this name, instead of backends

    @model_validator(mode="after")
    def _backends_or_group(self) -> ModelSpec:
        if bool(self.backends) == (self.group is not None):
            raise ValueError("give either 'backends' (at least one) or 'group', not both")
        if self.group is not None and (self.fallback or self.hedge):
            raise ValueError("a group's 'fallback' and 'hedge' belong on its tiers' models")
        return self


class RetrySpec(_Strict):
    max_attempts: int = Field(3, ge=1)  # per model in the chain
    backoff_base: float = Field(0.025, ge=0)
    backoff_cap: float = Field(1.0, ge=0)
    budget_ratio: float = Field(0.2, ge=0)
    budget_min: int = Field(10, ge=0)
    max_wait: float = Field(1.0, ge=0)  # longest wait for a Retry-After when nothing else can serve


class BreakerSpec(_Strict):
    failures: int = Field(5, ge=1)
    window: float = Field(10.0, gt=0)
    open_for: float = Field(5.0, gt=0)
    probes: int = Field(1, ge=1)
    successes: int = Field(2, ge=1)


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: str | None = None  # clients must send it as a bearer token
    deadline: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(4 << 20, ge=1)
    load_factor: float = Field(1.5, ge=1.0)  # the chooser's bound: at most this × the mean load
    policy: Literal["affinity", "least_loaded", "round_robin"] = "affinity"  # routing/chooser.py
    # A backend where the request's expected TTFT (wait + its uncached prefill) is above the best by more than
    # ttft_slack seconds AND more than ttft_ratio times is passed over (routing/chooser.py).
    ttft_slack: float = Field(0.25, ge=0)
    ttft_ratio: float = Field(2.0, ge=1.0)
    poll_interval: float = Field(1.0, ge=0)  # seconds between reads of tailserve backends' load; 0: off
    # The CPUs the gateway runs on (sched_setaffinity). Its one event loop thread, woken twice per
    # request, otherwise moves between cores and starts each request with cold caches: pinned, the hop
    # costs ~0.2 ms less at one stream (BENCHMARKS.md). Give it a core the backends' engines leave free
    # (spawned backends share the other CPUs: spawn.py).
    cpus: list[int] | None = Field(None, min_length=1)
    otel_exporter: Literal["console", "otlp"] | None = None
    retry: RetrySpec = Field(default_factory=RetrySpec)
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    models: dict[str, ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _cpus_exist(self) -> GatewayConfig:
        check_cpus(self.cpus or [], "cpus")
        return self

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> GatewayConfig:
        for name, spec in self.models.items():
            for i, other in enumerate(spec.fallback):
                if other not in self.models:
                    raise ConfigError(f"models.{name}.fallback[{i}]: no model named {other!r}")
                if other == name:
                    raise ConfigError(f"models.{name}.fallback[{i}]: a model cannot fall back to itself")
                if self.models[other].group is not None:
                    raise ConfigError(f"models.{name}.fallback[{i}]: {other!r} is a group, not a model")
            for tier, model in (spec.group.tiers if spec.group else {}).items():
                if model not in self.models or self.models[model].group is not None:
                    raise ConfigError(
                        f"models.{name}.group.tiers.{tier}: {model!r} is not a model with backends"
                    )
        return self


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(data: Any, source: str = "config") -> GatewayConfig:
    """`data` (the parsed YAML) as a GatewayConfig, or a ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = _where(tuple(p for p in first["loc"] if p not in ("function-after",)))
        msg = first["msg"].removeprefix("Value error, ")
        if isinstance(first.get("ctx", {}).get("error"), ConfigError):
            raise ConfigError(f"{source}: {first['ctx']['error']}") from None
        raise ConfigError(f"{source}: {where or '(top level)'}: {msg}") from None


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path))
