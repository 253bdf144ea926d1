"""The C++ CPU kernels (src/tailserve/csrc/*.cpp), compiled once per CPU tier and cached.

One set of sources, written over a thin vector layer (csrc/simd.h), is compiled per instruction-set
tier with that tier's explicit flags (never -march=native, so a build is valid on every CPU of its
tier), into `$TAILSERVE_HOME/torch_extensions/<name>-<tier>-<key>`. The sources are several
translation units (the bindings, the fused step, the single ops), which ninja compiles in parallel:
a cold build's wall time is the longest unit's, not the sum. The tier is chosen at run time from the
CPU's features, best first; `TAILSERVE_CPU_TIER=<tier>` caps the choice, so a machine can run (and
test) every tier below its own. The first use of a tier builds it (a few tens of seconds); later starts
only load the cached library. Where no build is possible (no compiler, CUDA-only use) callers fall back
to plain PyTorch, and one log line says which path runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from tailserve.models.loader import cache_home

log = logging.getLogger("tailserve.kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"

_X86_BASE = ("avx2", "fma", "f16c")
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
_X86 = ("x86_64", "AMD64", "i686")
_ARM = ("aarch64", "arm64")
# Best first: (tier, machines it runs on (empty: any), CPU flags it needs as /proc/cpuinfo names them,
# compiler flags). A cap (TAILSERVE_CPU_TIER) orders the tiers of one machine family, portable last.
TIERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "avx512-bf16",
        _X86,
        (*_X86_BASE, *_AVX512, "avx512_bf16"),
        (
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512dq",
            "-mavx512vl",
            "-mavx512vnni",
            "-mavx512bf16",
        ),
    ),
    (
        "avx512-vnni",
        _X86,
        (*_X86_BASE, *_AVX512),
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"),
    ),
    ("avx-vnni", _X86, (*_X86_BASE, "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    ("avx2", _X86, _X86_BASE, ("-mavx2", "-mfma", "-mf16c")),
    # ARMv8.2's dot product (Graviton 2 and later, Ampere Altra, Apple M1 and later): an explicit
    # architecture level, not -mcpu=native, so one build serves every such CPU.
    ("neon-dotprod", _ARM, ("asimd", "asimddp"), ("-march=armv8.2-a+dotprod",)),
    ("portable", (), (), ()),
)
TIER_NAMES = tuple(name for name, *_ in TIERS)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature names: x86's "flags" line, AArch64's "Features"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def tiers_of(machine: str | None = None) -> list[str]:
    """The tiers a machine of this family can have, best first (portable last)."""
    machine = machine or platform.machine()
    return [name for name, machines, _, _ in TIERS if not machines or machine in machines]


def runnable_tiers(flags: frozenset[str] | None = None, machine: str | None = None) -> list[str]:
    """Every tier this CPU can execute, best first (portable always)."""
    flags = cpu_flags() if flags is None else flags
    needs = {name: set(n) for name, _, n, _ in TIERS}
    return [t for t in tiers_of(machine) if needs[t] <= flags]


def choose_tier(
    cap: str | None = None, flags: frozenset[str] | None = None, machine: str | None = None
) -> str:
    """The best tier the CPU runs, at most `cap` (default: $TAILSERVE_CPU_TIER); a cap of another
    machine family's tier leaves only the portable one."""
    cap = cap if cap is not None else os.environ.get("TAILSERVE_CPU_TIER") or None
    tiers = runnable_tiers(flags, machine)
    if cap is None:
        return tiers[0]
    if cap not in TIER_NAMES:
        raise ValueError(f"TAILSERVE_CPU_TIER={cap!r}: use one of {', '.join(TIER_NAMES)}")
    family = tiers_of(machine)
    below = family[family.index(cap) :] if cap in family else ["portable"]
    return next(t for t in tiers if t in below)


def tier_flags(tier: str) -> list[str]:
    """The instruction-set flags a tier is compiled with."""
    return list(next(f for name, _, _, f in TIERS if name == tier))


def _compile_flags(tier: str) -> list[str]:
    # Hidden: the units share names (namespace tailserve) through the linker, inside this module only;
    # exported, they would meet another tier's module loaded in the same process (tests load several).
    return ["-O3", "-fopenmp", "-fvisibility=hidden", *tier_flags(tier)]


def sources(csrc: Path = CSRC) -> list[Path]:
    """The translation units of a kernels folder: every .cpp in it (a revision with one unit or several)."""
    return sorted(csrc.glob("*.cpp"))


def _build_key(csrc: Path, tier: str) -> str:
    """Keyed by the tier's flags, torch, and every source and header, so an edited header never meets a
    stale build (the flags are explicit, so a build serves every CPU of its tier)."""
    h = hashlib.sha256(f"{_compile_flags(tier)}|{torch.__version__}".encode())
    for f in sorted(csrc.glob("*.[ch]*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_dir(tier: str, csrc: Path = CSRC, name: str = "tailserve_kernels") -> Path:
    return cache_home() / "torch_extensions" / f"{name}-{tier}-{_build_key(csrc, tier)}"


def is_built(tier: str) -> bool:
    return any(build_dir(tier).glob("*.so"))


def build(csrc: Path = CSRC, name: str = "tailserve_kernels", tier: str | None = None) -> ModuleType:
    """Compile (or load the cached build of) the kernels in `csrc` for `tier` (default: this CPU's) as
    module `<name>_<tier>`. Another name and source folder give a second, independent module in the same
    process: benchmarks/step_ab.py runs an older revision's kernels beside these."""
    tier = tier or choose_tier()
    module = f"{name}_{tier.replace('-', '_')}"
    folder = build_dir(tier, csrc, name)
    built = _import_built(module, folder / f"{module}.so")
    if built is not None:
        return built
    from torch.utils import cpp_extension  # only to compile: it imports setuptools (~0.1 s of a start)

    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=module,
        sources=[str(f) for f in sources(csrc)],
        build_directory=str(folder),
        extra_cflags=_compile_flags(tier),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _import_built(module: str, library: Path) -> ModuleType | None:
    """The library built before, imported directly: its folder's key already names its sources, flags
    and torch, so it is current. This skips cpp_extension's checks (a ninja run and a lock the folder
    shares with any other process loading it: up to a second at start). None: build (or wait) as usual."""
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(module, library)
        if spec is None or spec.loader is None:
            return None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except ImportError:  # half-written by a build in progress, or foreign: the usual path decides
        return None
    sys.modules[module] = mod
    return mod


def ops(tier: str | None = None) -> ModuleType | None:
    """The compiled module of `tier` (default: the chosen one, $TAILSERVE_CPU_TIER read at each call,
    so tests can run every tier in one process), or None when it cannot be built here (the reason is
    logged once)."""
    return _ops(tier or _chosen(os.environ.get("TAILSERVE_CPU_TIER") or None))


@functools.cache
def _chosen(cap: str | None) -> str:
    return choose_tier(cap)


@functools.cache
def _ops(tier: str) -> ModuleType | None:
    if os.environ.get("TAILSERVE_DISABLE_KERNELS"):
        log.info("C++ kernels disabled by TAILSERVE_DISABLE_KERNELS: using PyTorch ops")
        return None
    try:
        module = build(tier=tier)
    except Exception as e:  # any toolchain failure means: use the PyTorch path
        log.warning("C++ kernels unavailable (%s: %s): using PyTorch ops", type(e).__name__, str(e)[-500:])
        return None
    if module.tier() != tier:
        log.warning("C++ kernels built for %s report tier %s: using PyTorch ops", tier, module.tier())
        return None
    log.info("C++ kernels for CPU tier %s loaded from %s", tier, module.__file__)
    return module


def active_tier() -> str | None:
    """The tier the default kernels run at, or None on the PyTorch path."""
    mod = ops()
    return None if mod is None else mod.tier()
