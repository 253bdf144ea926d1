"""The latency policies' config: off unless set, and every bad key named before anything is served."""

from __future__ import annotations

from typing import Any

import pytest

from tailserve.gateway.config import ConfigError, parse_config
from tailserve.gateway.policy_config import RouterSpec, build_router
from tailserve.routing.tiers import FeatureRouter, TierChoice

B = [{"url": "http://127.0.0.1:9"}]


def cfg(group: dict[str, Any] | None = None, **small: Any) -> dict[str, Any]:
    models: dict[str, Any] = {"s": {"backends": B, **small}, "l": {"backends": B}}
    if group is not None:
        models["m"] = {"group": group}
    return {"models": models}


class EchoRouter:
    """A user's router: always the tier it was built with."""

    def __init__(self, tier: str) -> None:
        self.tier = tier

    def route(self, body: Any, hint: str | None, tiers: Any) -> TierChoice:
        return TierChoice(self.tier, 0.0, "echo")


def test_policies_are_off_unless_configured() -> None:
    c = parse_config(cfg())
    assert c.models["s"].hedge is None and c.models["s"].group is None
    c = parse_config(cfg({"tiers": {"small": "s", "large": "l"}}, hedge={"delay": 0.2}))
    group = c.models["m"].group
    assert group is not None and group.degrade is None and group.escalate == []
    assert c.models["s"].hedge is not None and c.models["s"].hedge.max_share == 0.05


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (cfg(hedge={"max_share": 2}), "models.s.hedge.max_share: Input should be less than or equal to 1"),
        (cfg(hedge={"quantile": 1}), "models.s.hedge.quantile"),
        (cfg(hedge={"dealy": 1}), "models.s.hedge.dealy: Extra inputs are not permitted"),
        (cfg({"tiers": {"small": "s", "large": "x"}}), "models.m.group.tiers.large: 'x' is not a model"),
        (cfg({"tiers": {"small": "s"}}), "models.m.group.tiers"),
        (
            cfg(
                {
                    "tiers": {"small": "s", "large": "l"},
                    "degrade": {"ttft_slo": 1, "order": ["huge", "small"]},
                }
            ),
            "models.m.group: degrade.order[0]: 'huge' is not one of the tiers",
        ),
        (
            cfg({"tiers": {"small": "s", "large": "l"}, "escalate": ["bad"]}),
            "models.m.group.escalate[0]",
        ),
        (
            cfg({"tiers": {"small": "s", "large": "l"}, "router": {"class": "nowhere.mod:R"}}),
            "models.m.group: router.class: cannot load 'nowhere.mod:R'",
        ),
        (
            cfg({"tiers": {"small": "s", "large": "l"}, "router": {"args": {"thresholds": [1, 2]}}}),
            "models.m.group: router.args.thresholds: need 1 ascending numbers",
        ),
        (
            cfg({"tiers": {"small": "s", "large": "l"}, "router": {"args": {"nope": 1}}}),
            "models.m.group: router.args:",
        ),
        (
            {"models": {"m": {"backends": B, "group": {"tiers": {"a": "m", "b": "m"}}}}},
            "models.m: give either 'backends' (at least one) or 'group'",
        ),
        (
            {
                "models": {
                    "s": {"backends": B, "fallback": ["m"]},
                    "m": {"group": {"tiers": {"a": "s", "b": "s"}}},
                }
            },
            "models.s.fallback[0]: 'm' is a group",
        ),
    ],
)
def test_bad_policy_config_names_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(config)
    assert message in str(e.value)


def test_a_users_router_is_built_from_the_config() -> None:
    spec = RouterSpec.model_validate({"class": f"{__name__}:EchoRouter", "args": {"tier": "large"}})
    router = build_router(spec, 2)
    assert router.route({}, None, ["small", "large"]).tier == "large"
    assert isinstance(build_router(RouterSpec(), 2), FeatureRouter)
