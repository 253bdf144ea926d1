"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

from tailserve.layers import kernels

RUNNABLE = kernels.runnable_tiers()
# Every CPU tier of this machine's family, best first; a tier this CPU cannot execute skips, saying so.
# (Another family's tiers run elsewhere: tests/unit/test_arm_tier.py runs AArch64's under qemu.)
TIERS = [
    pytest.param(t, marks=pytest.mark.skipif(t not in RUNNABLE, reason=f"this CPU cannot run the {t} tier"))
    for t in kernels.tiers_of()
]


def pytest_sessionstart(session) -> None:
    """A fresh machine compiles one kernels library per runnable tier (~15 s each): start those builds in
    the background, two at a time, so they overlap the tests that need no kernels; a test that needs a
    tier still building waits on its build's lock (layers/kernels.py) instead of compiling it."""
    if os.environ.get("TAILSERVE_DISABLE_KERNELS") or not (shutil.which("c++") or shutil.which("g++")):
        return
    todo = [t for t in RUNNABLE if not kernels.is_built(t)]
    code = "import sys; from tailserve.layers import kernels; kernels.build(tier=sys.argv[1])"

    def lane(tiers: list[str]) -> None:
        for t in tiers:
            subprocess.run([sys.executable, "-c", code, t], capture_output=True, timeout=900, check=False)

    for share in (todo[0::2], todo[1::2]):
        if share:
            threading.Thread(target=lane, args=(share,), daemon=True).start()


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
