"""Fixtures shared by every test folder."""

from __future__ import annotations

import shutil

import pytest

from tailserve.layers import kernels

RUNNABLE = kernels.runnable_tiers()
# Every CPU tier, best first; a tier this CPU cannot execute skips, saying so.
TIERS = [
    pytest.param(t, marks=pytest.mark.skipif(t not in RUNNABLE, reason=f"this CPU cannot run the {t} tier"))
    for t in kernels.TIER_NAMES
]


@pytest.fixture(params=TIERS)
def cpu_tier(request, monkeypatch) -> str:
    """Runs the test at each CPU tier: the kernels every layer and fused model picks by default are
    that tier's for the test's duration ($TAILSERVE_CPU_TIER, read at each kernels.ops() call)."""
    monkeypatch.setenv("TAILSERVE_CPU_TIER", request.param)
    if kernels.ops() is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ toolchain is present, so the {request.param} kernels must build")
        pytest.skip("no C++ toolchain: the kernels cannot be built here")
    return request.param
