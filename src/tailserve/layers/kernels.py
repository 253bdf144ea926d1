"""The C++ CPU kernels (src/tailserve/csrc/*.cpp), compiled once per CPU tier and cached.

One set of sources, written over a thin vector layer (csrc/simd.h), is compiled per instruction-set
tier with that tier's explicit flags (never -march=native, so a build is valid on every CPU of its
tier), into `$TAILSERVE_HOME/kernels/<name>-<tier>-<key>/`. The library is plain C++ behind a C
interface (csrc/capi.cpp), loaded with ctypes: neither its build nor its use imports PyTorch, so the
fused step serves from a process that never imports torch. The sources are several translation units
(the C interface, the fused step, the single ops), compiled in parallel: a cold build's wall time is
the longest unit's, not the sum. The tier is chosen at run time from the
CPU's features, best first; `TAILSERVE_CPU_TIER=<tier>` caps the choice, so a machine can run (and
test) every tier below its own. The first use of a tier builds it (a few tens of seconds); later starts
only load the cached library. Where no build is possible (no compiler, CUDA-only use) callers fall back
to plain PyTorch, and one log line says which path runs.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from ctypes import POINTER, c_char_p, c_double, c_int, c_int64, c_void_p
from pathlib import Path

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
    # Hidden: the units share names (namespace tailserve) through the linker, inside this library only;
    # the C interface's entries are the only exported symbols, and each tier's library is loaded on
    # its own (RTLD_LOCAL), so the tiers a test loads side by side never meet. OpenMP only for its
    # `simd` pragmas: the threads are the library's own team (csrc/team.h).
    return ["-O3", "-std=c++17", "-fPIC", "-fopenmp-simd", "-fvisibility=hidden", *tier_flags(tier)]


def sources(csrc: Path = CSRC) -> list[Path]:
    """The translation units of a kernels folder: every .cpp in it (a revision with one unit or several)."""
    return sorted(csrc.glob("*.cpp"))


def _build_key(csrc: Path, tier: str) -> str:
    """Keyed by the tier's flags and every source and header, so an edited header never meets a stale
    build (the flags are explicit, so a build serves every CPU of its tier)."""
    h = hashlib.sha256(f"{_compile_flags(tier)}".encode())
    for f in sorted(csrc.glob("*.[ch]*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_dir(tier: str, csrc: Path = CSRC, name: str = "tailserve_kernels") -> Path:
    return cache_home() / "kernels" / f"{name}-{tier}-{_build_key(csrc, tier)}"


def is_built(tier: str) -> bool:
    return any(build_dir(tier).glob("*.so"))


class TsLinear(ctypes.Structure):
    """A packed weight as csrc/capi.cpp takes it: kind (csrc/linear.h), buffer and bytes, scales and count."""

    _fields_ = [
        ("kind", c_int64),
        ("w", c_void_p),
        ("w_bytes", c_int64),
        ("s", c_void_p),
        ("s_count", c_int64),
        ("n", c_int64),
        ("k", c_int64),
        ("group", c_int64),
    ]


class TsBatch(ctypes.Structure):
    """One step's batch (csrc/llama.h: Batch)."""

    _fields_ = [
        ("ids", c_void_p),
        ("T", c_int64),
        ("seqs", c_void_p),
        ("S", c_int64),
        ("tables", c_void_p),
        ("nblk", c_int64),
        ("sliding_tables", c_void_p),
        ("nblk_s", c_int64),
        ("block_size", c_int64),
        ("sample_rows", c_void_p),
        ("R", c_int64),
    ]


class TsCaches(ctypes.Structure):
    """Every layer's K and V pool and its blocks (csrc/llama.h: Caches)."""

    _fields_ = [("k", c_void_p), ("v", c_void_p), ("blocks", c_void_p), ("layers", c_int64)]


_P = c_void_p
_I = c_int64
_LIN = POINTER(TsLinear)
_SIGNATURES: dict[str, tuple[type | None, list]] = {
    "ts_error": (c_char_p, []),
    "ts_tier": (c_char_p, []),
    "ts_peak_macs": (c_int, [_I, _I, _P]),
    "ts_linear": (c_int, [_LIN, _P, _I, _P, _I]),
    "ts_decode_attention": (c_int, [_I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _I, _I, _P, c_double, _I]),
    "ts_llama_new": (c_int, [_I, _I, _I, c_double, _P, _I, _I, _P, _LIN, _P, _P, _I, POINTER(c_void_p)]),
    "ts_llama_free": (None, [_P]),
    "ts_llama_set_family": (c_int, [_P, c_double, c_double, _I, c_double, _I, _P, _P]),
    "ts_llama_add_layer": (c_int, [_P, _P, _P, _LIN, _LIN, _LIN, _LIN]),
    "ts_llama_set_layer_options": (c_int, [_P, _I, _P, _P, _P, _P, _P, _I]),
    "ts_llama_set_draft_head": (c_int, [_P, _LIN]),
    "ts_llama_set_threads": (c_int, [_P, _I]),
    "ts_llama_step": (c_int, [_P, POINTER(TsBatch), POINTER(TsCaches), _I, _P]),
    "ts_llama_take_phase_seconds": (c_int, [_P, _P]),
}


class Kernels:
    """One tier's compiled library. `call` runs an entry of csrc/capi.cpp and raises its error."""

    def __init__(self, library: Path) -> None:
        self.file = str(library)
        self.lib = ctypes.CDLL(self.file)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def call(self, name: str, *args) -> None:
        if getattr(self.lib, name)(*args) != 0:
            raise RuntimeError(self.lib.ts_error().decode())

    def tier(self) -> str:
        return self.lib.ts_tier().decode()

    def peak_macs(self, threads: int, iters: int) -> dict[str, float]:
        """The tier's int8 and bf16 dot-product multiply-adds per second on `threads` of the team."""
        out = (c_double * 2)()
        self.call("ts_peak_macs", threads, iters, out)
        return {"int8_macs_per_s": out[0], "bf16_macs_per_s": out[1]}


def build(csrc: Path = CSRC, name: str = "tailserve_kernels", tier: str | None = None) -> Kernels:
    """Compile (or load the cached build of) the kernels in `csrc` for `tier` (default: this CPU's).
    Another name and source folder give a second, independent library in the same process:
    benchmarks/step_ab.py runs another revision's kernels beside these."""
    tier = tier or choose_tier()
    folder = build_dir(tier, csrc, name)
    library = folder / f"{name}_{tier.replace('-', '_')}.so"
    if not library.is_file():
        _compile(csrc, tier, library)
    return Kernels(library)


def _compile(csrc: Path, tier: str, library: Path) -> None:
    """Each translation unit compiled at once in its own process, then linked. A lock on the folder: a
    second process building the same library waits for the first, then finds it built."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or $CXX)")
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return
        flags = [*_compile_flags(tier), f"-I{csrc}"]
        units = [(src, folder / f"{src.stem}.o") for src in sources(csrc)]
        procs = [
            subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE)
            for src, obj in units
        ]
        errors = [p.communicate()[1].decode(errors="replace") for p in procs]
        failed = [(src.name, err) for (src, _), p, err in zip(units, procs, errors) if p.returncode]
        if failed:
            raise RuntimeError(f"compiling {failed[0][0]} failed:\n{failed[0][1][-2000:]}")
        tmp = library.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(
            [cxx, "-shared", "-pthread", *[str(obj) for _, obj in units], "-o", str(tmp)],
            check=True,
            capture_output=True,
        )
        tmp.replace(library)


def ops(tier: str | None = None) -> Kernels | None:
    """The compiled library of `tier` (default: the chosen one, $TAILSERVE_CPU_TIER read at each call,
    so tests can run every tier in one process), or None when it cannot be built here (the reason is
    logged once)."""
    return _ops(tier or _chosen(os.environ.get("TAILSERVE_CPU_TIER") or None))


@functools.cache
def _chosen(cap: str | None) -> str:
    return choose_tier(cap)


@functools.cache
def _ops(tier: str) -> Kernels | None:
    if os.environ.get("TAILSERVE_DISABLE_KERNELS"):
        log.info("C++ kernels disabled by TAILSERVE_DISABLE_KERNELS: using PyTorch ops")
        return None
    try:
        lib = build(tier=tier)
    except Exception as e:  # any toolchain failure means: use the PyTorch path
        log.warning("C++ kernels unavailable (%s: %s): using PyTorch ops", type(e).__name__, str(e)[-500:])
        return None
    if lib.tier() != tier:
        log.warning("C++ kernels built for %s report tier %s: using PyTorch ops", tier, lib.tier())
        return None
    log.info("C++ kernels for CPU tier %s loaded from %s", tier, lib.file)
    return lib


def active_tier() -> str | None:
    """The tier the default kernels run at, or None on the PyTorch path."""
    mod = ops()
    return None if mod is None else mod.tier()
