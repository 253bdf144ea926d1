"""The C++ CPU kernels (src/tailserve/csrc/kernels.cpp), compiled once per machine and cached.

The first use builds the extension with `-O3 -march=native` under `$TAILSERVE_HOME/torch_extensions`
(a few tens of seconds); later starts only load the cached library. Where the build is impossible
(no compiler, CUDA-only use) callers fall back to plain PyTorch, and one log line says which path runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from tailserve.models.loader import cache_home

log = logging.getLogger("tailserve.kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "kernels.cpp"  # includes the headers beside it


def _build_key(csrc: Path = CSRC) -> str:
    """The build is -march=native: key it by the CPU's flags so a shared cache never serves a foreign CPU,
    and by every source and header, so an edited header never meets a stale build."""
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        )
    except OSError:
        flags = ""
    h = hashlib.sha256(f"{flags}|{torch.__version__}".encode())
    for f in sorted(csrc.glob("*.[ch]*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build(csrc: Path = CSRC, name: str = "tailserve_kernels") -> ModuleType:
    """Compile (or load the cached build of) the kernels in `csrc` as module `name`. Another name and
    source folder give a second, independent module in the same process: benchmarks/step_ab.py runs an
    older revision's kernels beside these."""
    from torch.utils import cpp_extension

    build_dir = cache_home() / "torch_extensions" / f"{name}-{_build_key(csrc)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(csrc / SOURCE.name)],
        build_directory=str(build_dir),
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def ops() -> ModuleType | None:
    """The compiled module, or None when it cannot be built here (the reason is logged once)."""
    if os.environ.get("TAILSERVE_DISABLE_KERNELS"):
        log.info("C++ kernels disabled by TAILSERVE_DISABLE_KERNELS: using PyTorch ops")
        return None
    try:
        module = build()
    except Exception as e:  # any toolchain failure means: use the PyTorch path
        log.warning("C++ kernels unavailable (%s: %s): using PyTorch ops", type(e).__name__, str(e)[-500:])
        return None
    log.info(
        "C++ kernels loaded from %s (paged decode attention%s)",
        module.__file__,
        ", bf16/int8/int4 linears" if module.has_bf16_linear() else "; no AVX512-BF16, so PyTorch linears",
    )
    return module
