"""The latency policies' part of gateway.yaml: hedging per model, and model groups (tiers behind one
public name, a router, escalation, degrade). Everything is off unless configured.

```yaml
models:
  chat-small:
    backends: [{url: http://10.0.0.6:8000}, {url: http://10.0.0.7:8000}]
    hedge: {delay: null, quantile: 0.95, min_samples: 20, max_share: 0.05, window: 10, max_load: 4}
  chat-large:
    backends: [{url: http://10.0.0.8:8000}]
  chat:                                   # the public name; answers come from one of its tiers
    group:
      tiers: {small: chat-small, large: chat-large}   # smallest first; each a model of this file
      router: {args: {long_prompt_chars: 2000, thresholds: [1.0]}}  # or {class: "pkg.mod:MyRouter"}
      escalate: [empty, length, invalid_json]          # re-run failing small answers on the largest tier
      degrade: {ttft_slo: 2.0, order: [large, small]}  # when large cannot make the SLO, use small
```
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tailserve.routing.tiers import FeatureRouter, TierRouter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HedgeSpec(_Strict):
    delay: float | None = Field(None, ge=0)  # seconds; None: the backend's observed quantile of TTFT
    quantile: float = Field(0.95, gt=0, lt=1)
    min_samples: int = Field(20, ge=1)
    max_share: float = Field(0.05, ge=0, le=1)
    window: float = Field(10.0, gt=0)
    max_load: float = Field(4.0, gt=0)


class RouterSpec(_Strict):
    # "module:Class" of a TierRouter, built with `args`; None: routing.tiers.FeatureRouter
    class_: str | None = Field(None, alias="class")
    args: dict[str, Any] = Field(default_factory=dict)


class DegradeSpec(_Strict):
    ttft_slo: float = Field(gt=0)  # seconds; a request's X-Tailserve-TTFT-SLO header overrides it
    order: list[str] = Field(min_length=2)  # tiers, the first to give way first
    # When no tier is predicted to meet the SLO: answer 503 + Retry-After at once (reason "shed")
    # instead of serving late. Off: the fastest tier serves it, late.
    shed: bool = False


class GroupSpec(_Strict):
    tiers: dict[str, str] = Field(min_length=2)  # tier name → model of this file, smallest first
    router: RouterSpec = Field(default_factory=RouterSpec)
    escalate: list[Literal["empty", "length", "invalid_json"]] = Field(default_factory=list)
    degrade: DegradeSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GroupSpec:
        for i, t in enumerate(self.degrade.order if self.degrade else []):
            if t not in self.tiers:
                raise ValueError(f"degrade.order[{i}]: {t!r} is not one of the tiers {list(self.tiers)}")
        build_router(self.router, len(self.tiers))  # a router that cannot be built fails here, named
        return self


def build_router(spec: RouterSpec, tiers: int) -> TierRouter:
    """The group's router: `spec.class_` ("module:Class") built with `spec.args`, or the feature router."""
    if spec.class_ is None:
        try:
            router = FeatureRouter(**spec.args)
        except TypeError as e:
            raise ValueError(f"router.args: {e}") from None
        cuts = list(router.thresholds) if router.thresholds is not None else None
        if cuts is not None and (len(cuts) != tiers - 1 or cuts != sorted(cuts)):
            raise ValueError(f"router.args.thresholds: need {tiers - 1} ascending numbers, got {cuts}")
        return router
    module, _, name = spec.class_.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"router.class: cannot load {spec.class_!r} ({e})") from None
    try:
        router = cls(**spec.args)
    except TypeError as e:
        raise ValueError(f"router.args: {e}") from None
    if not callable(getattr(router, "route", None)):
        raise ValueError(f"router.class: {spec.class_!r} has no route(body, hint, tiers) method")
    return router
