"""The predicted-TTFT scale-up rule (cluster/autoscale.py), as plain numbers."""

from __future__ import annotations

import pytest

from tailserve.cluster.autoscale import replicas_for_ttft
from tailserve.cluster.config import ClusterConfig


def test_replicas_grow_in_proportion_to_how_far_ttft_is_past_its_target() -> None:
    assert replicas_for_ttft(2, [0.3, 0.5], 0.2) == 4  # mean 0.4: twice the target, twice the replicas
    assert replicas_for_ttft(3, [0.25], 0.2) == 4  # 3.75 rounded up
    assert replicas_for_ttft(1, [1.0], 0.1) == 10


def test_at_or_under_target_or_without_a_prediction_it_adds_nothing() -> None:
    assert replicas_for_ttft(2, [0.1, 0.2], 0.2) == 2
    assert replicas_for_ttft(2, [], 0.2) == 2
    assert replicas_for_ttft(2, [0.0, 0.0], 0.2) == 2  # replicas that have measured no step yet
    assert replicas_for_ttft(2, [0.0, 0.6], 0.2) == 6  # only the replica that predicts counts


def test_the_flag_needs_a_positive_target_and_room_to_scale() -> None:
    with pytest.raises(ValueError, match="scale-on-ttft"):
        ClusterConfig(replicas=1, scale_on_ttft=0.5)  # no --max-replicas
    with pytest.raises(ValueError, match="scale-on-ttft"):
        ClusterConfig(replicas=1, max_replicas=2, scale_on_ttft=0.0)
    ClusterConfig(replicas=1, max_replicas=2, scale_on_ttft=0.5)
