"""Scale-up on predicted TTFT, beside Ray Serve's policy on requests in flight.

Ray's policy counts requests in flight per replica and adds a replica only after the count has stayed
above `target_ongoing` for `upscale_delay`: a burst of long prompts can push every new request's
TTFT past its SLO while few requests are in flight, and a replica takes ~2.5 s to start (BENCHMARKS.md,
"Cold start without PyTorch"), so that is late. Each replica reports the TTFT it predicts for a new
request of 256 prompt tokens (its admission's step-time model over the work it holds); when their
mean passes `target_ttft_s`, this policy wants as many replicas as would bring it back to the target,
the queued work spread over more of them, and otherwise what Ray's rule wants (requests in flight over
`target_ongoing`). Ray applies its own upscale and downscale delays, scaling factors and bounds to
the policy's answer, as to its default policy's. A replica that has predicted nothing yet (no step
measured) reports 0 and does not count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

TTFT_METRIC = "predicted_ttft_s"  # what EngineReplica.record_autoscaling_stats reports


def replicas_for_ttft(current: int, ttfts: Iterable[float], target: float) -> int:
    """Replicas that would bring the mean predicted TTFT down to `target`, if TTFT falls in proportion
    to the replicas sharing the queued work; never fewer than `current` (this rule only adds)."""
    values = [t for t in ttfts if t > 0]
    if current < 1 or not values:
        return current
    mean = sum(values) / len(values)
    return current if mean <= target else math.ceil(current * mean / target)


class PredictedTtftPolicy:
    """A Ray Serve autoscaling policy (`AutoscalingPolicy(policy_function=PredictedTtftPolicy,
    policy_kwargs={"target_ttft_s": ...})`): the replicas Ray's rule wants, raised to
    `replicas_for_ttft`'s. Ray wraps it with its delays, factors and bounds."""

    def __init__(self, target_ttft_s: float) -> None:
        self.target = target_ttft_s

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        in_flight = ctx.total_num_requests / ctx.config.target_ongoing_requests
        ttfts = (ctx.aggregated_metrics or {}).get(TTFT_METRIC, {}).values()
        return max(
            in_flight, replicas_for_ttft(ctx.current_num_replicas, ttfts, self.target)
        ), ctx.policy_state
