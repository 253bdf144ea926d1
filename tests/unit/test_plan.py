"""`tailserve plan` on a recorded sweep (tests/data: tailserve serve on this 2-core machine, chat workload,
concurrency 1 and 16) against the same plan computed by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tailserve.bench.plan import Demand, plan, read_sweep
from tailserve.cli import main

SWEEP = Path(__file__).resolve().parents[1] / "data" / "sweep_chat_c1_c16.json"


def test_the_plan_is_the_hand_computation() -> None:
    sweep = read_sweep(json.loads(SWEEP.read_text()))
    # By hand, from the file: c1 0.37365 req/s (p99 TTFT 82 ms, TPOT 56 ms), c16 1.71322 req/s (460 ms,
    # 170 ms); 64 output tokens. Planned: 5 req/s of 400 in / 128 out, SLO 500 ms / 200 ms, 80 %.
    # Both points meet the SLO, so capacity = 1.71322 x 64/128 = 0.85661 req/s; replicas =
    # ceil(5 / (0.85661 x 0.8)) = ceil(7.296) = 8; headroom = 1 - 5 / (8 x 0.85661) = 0.2704.
    # Each replica carries 5/8 = 0.625 req/s = 1.25 req/s in the sweep's units, 0.6542 of the way from
    # c1 to c16: p99 TTFT 81.95 + 0.6542 x (460.31 - 81.95) = 329.5 ms.
    got = plan(sweep, Demand(5, 400, 128, 0.5, 0.2, 0.8))
    assert got.replicas == 8 and got.capacity_point == "concurrency=16"
    assert got.capacity_rps == pytest.approx(0.85661, abs=1e-4)
    assert got.headroom == pytest.approx(0.2704, abs=1e-3)
    assert got.predicted_ttft_p99_s == pytest.approx(0.3295, abs=1e-3)
    assert not got.warnings
    # A 100 ms TPOT objective: only c1 meets it. ceil(5 / (0.37365 x 0.5 x 0.8)) = ceil(33.45) = 34.
    tight = plan(sweep, Demand(5, 400, 128, 0.5, 0.1, 0.8))
    assert tight.replicas == 34 and tight.capacity_point == "concurrency=1"
    with pytest.raises(ValueError, match="no load point"):
        plan(sweep, Demand(5, 400, 128, 0.05, 0.2))
    assert plan(sweep, Demand(5, 2000, 128, 0.5, 0.2)).warnings  # prompts far beyond the sweep's


def test_the_worksheet(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan"
    args = ["plan", "--sweep", str(SWEEP), "--peak-rps", "5", "--prompt-tokens", "400"]
    args += ["--output-tokens", "128", "--slo-ttft", "500ms", "--slo-tpot", "200ms", "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("8 replicas for 5 req/s")
    rows = list(csv.DictReader((out / "worksheet.csv").read_text().splitlines()))
    assert [r["meets_slo"] for r in rows] == ["True", "True"]
    md = (out / "worksheet.md").read_text()
    assert "replicas: **8**" in md and "headroom at peak **27%**" in md
    assert (out / "curve.png").stat().st_size > 1000
    assert math.isclose(json.loads((out / "plan.json").read_text())["plan"]["per_replica_rps"], 0.625)
