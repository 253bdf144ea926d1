"""Model groups: tiers behind one public name. Per request: the router picks a tier (timed), degrade
may move it to a smaller tier when the routed one is predicted to miss the request's TTFT SLO, the
attempt loop runs it on that tier's model (its backends, hedging and fallbacks), and escalation may
re-run a failing small-tier answer on the largest tier. The decisions are `routing`'s pure functions;
this module feeds them the gateway's state and says what it did:

- `X-Tailserve-Tier`: the tier that answered (also the request header that hints a tier);
- `X-Tailserve-Degraded`: the reason, when the answer came from a smaller tier than routed, and the
  body's `tailserve` extension field (`{"tier", "routed_tier", "degraded"}`) on whole answers;
- `X-Tailserve-Escalated`: the check the small tier's answer failed, when it was re-run;
- with `degrade.shed`, a request no tier is predicted to serve within its SLO is answered 503 at once
  (`slo_unreachable`, Retry-After the best predicted TTFT, `X-Tailserve-Degraded: shed`): a client
  with a deadline learns now that it will be missed, and the tiers' queues stop growing past it.

A degraded request is not escalated: re-running it on the tier that was too slow would undo the SLO
the degrade kept. Streams are not escalated either: their bytes have reached the client.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from tailserve.api.errors import ApiError
from tailserve.gateway.attempts import Answer, Attempts, Call
from tailserve.gateway.config import GatewayConfig
from tailserve.gateway.hedge import Hedger
from tailserve.gateway.policy_config import DegradeSpec, build_router
from tailserve.gateway.policy_metrics import PolicyMetrics
from tailserve.gateway.relay import Relay
from tailserve.gateway.upstream import Pool
from tailserve.routing.chooser import TTFT_MAX_AGE
from tailserve.routing.degrade import CHARS_PER_TOKEN, degrade, tier_ttft
from tailserve.routing.tiers import TierRouter, escalation_reason, prompt_chars

TIER_HEADER = "x-tailserve-tier"
SLO_HEADER = "x-tailserve-ttft-slo"
DEGRADED_HEADER = "x-tailserve-degraded"
ESCALATED_HEADER = "x-tailserve-escalated"


@dataclass
class Group:
    name: str
    tiers: dict[str, str]  # tier → model, smallest first
    router: TierRouter
    escalate: list[str]
    degrade: DegradeSpec | None


class Groups:
    def __init__(
        self, config: GatewayConfig, pools: dict[str, Pool], hedger: Hedger, metrics: PolicyMetrics
    ) -> None:
        self.pools = pools
        self.hedger = hedger
        self.metrics = metrics
        self.groups = {
            name: Group(
                name,
                dict(spec.group.tiers),
                build_router(spec.group.router, len(spec.group.tiers)),
                list(spec.group.escalate),
                spec.group.degrade,
            )
            for name, spec in config.models.items()
            if spec.group is not None
        }

    def __contains__(self, model: str) -> bool:
        return model in self.groups

    def predicted(self, group: Group, tokens: float) -> dict[str, float | None]:
        """Each tier's predicted TTFT for a request of `tokens` prompt tokens (`routing.degrade`)."""
        now = time.monotonic()
        out = {}
        for tier, model in group.tiers.items():
            backends = self.pools[model].chooser.backends
            signals = [
                self.hedger.meter(b.name).signal(b.available(now), b.predicted_ttft(now, TTFT_MAX_AGE))
                for b in backends
            ]
            out[tier] = tier_ttft(signals, tokens)
        return out

    async def run(
        self, call: Call, headers: Mapping[str, str], attempts: Attempts
    ) -> tuple[Answer | Relay, dict[str, str]]:
        """`call` to group `call.model`: the answer, and the headers that say which tier gave it."""
        group = self.groups[call.model]
        names = list(group.tiers)
        start = time.perf_counter()
        tier = group.router.route(call.body, headers.get(TIER_HEADER), names).tier
        self.metrics.router_seconds.labels(group.name).observe(time.perf_counter() - start)
        routed, reason = tier, None
        if group.degrade is not None:
            slo = _seconds(headers.get(SLO_HEADER)) or group.degrade.ttft_slo
            tokens = prompt_chars(call.body) / CHARS_PER_TOKEN
            choice = degrade(tier, group.degrade.order, self.predicted(group, tokens), slo)
            if group.degrade.shed and choice.late is not None:
                self.metrics.degraded.labels(group.name, choice.tier, "shed").inc()
                return _shed(call.model, slo, choice.late), {DEGRADED_HEADER: "shed"}
            tier, reason = choice.tier, choice.reason
            if reason is not None:
                self.metrics.degraded.labels(group.name, tier, reason).inc()
        start = time.monotonic()
        result = await attempts.run(replace(call, model=group.tiers[tier]))
        extra: dict[str, str] = {}
        largest = names[-1]
        if group.escalate and reason is None and tier != largest and isinstance(result, Answer):
            failed = self._check(group, call, result, time.monotonic() - start)
            if failed is not None:
                extra[ESCALATED_HEADER] = failed
                tier = largest
                result = await attempts.run(replace(call, model=group.tiers[largest]))
        self.metrics.tier_requests.labels(group.name, tier).inc()
        extra[TIER_HEADER] = tier
        if reason is not None:
            extra[DEGRADED_HEADER] = reason
            if isinstance(result, Answer):
                result = _marked(result, {"tier": tier, "routed_tier": routed, "degraded": reason})
        return result, extra

    def _check(self, group: Group, call: Call, answer: Answer, seconds: float) -> str | None:
        """The escalation check a whole small-tier answer fails (None: it passes, or is an error)."""
        if answer.status != 200:
            return None
        try:
            data = json.loads(answer.body)
        except ValueError:
            data = {}
        reason = escalation_reason(call.body, data if isinstance(data, dict) else {}, group.escalate)
        if reason is not None:
            self.metrics.escalations.labels(group.name, reason).inc()
            self.metrics.escalation_seconds.labels(group.name).inc(seconds)
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                self.metrics.escalation_tokens.labels(group.name).inc(usage["total_tokens"])
        return reason


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds > 0 else None


def _marked(answer: Answer, note: dict[str, str]) -> Answer:
    """`answer` with the `tailserve` extension field added to its JSON body (unchanged if not JSON)."""
    if answer.status != 200:
        return answer
    try:
        data = json.loads(answer.body)
    except ValueError:
        return answer
    if not isinstance(data, dict):
        return answer
    data["tailserve"] = note
    return replace(answer, body=json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())


def _shed(model: str, slo: float, predicted: float) -> Answer:
    """The answer to a request that no tier is predicted to serve within its TTFT SLO."""
    wait = 60 if math.isinf(predicted) else max(1, math.ceil(predicted))
    return Answer.error(
        ApiError(
            503,
            f"no tier of {model!r} is predicted to give a first token within the request's TTFT SLO "
            f"({slo:g} s; the fastest predicts {predicted:.2f} s); retry later",
            code="slo_unreachable",
            headers={"Retry-After": str(wait)},
        )
    )
