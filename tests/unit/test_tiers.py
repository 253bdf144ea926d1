"""The CPU tier choice: from the CPU's flags, best first, capped by TAILSERVE_CPU_TIER."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailserve.layers import kernels

AVX2 = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "machine", "best"),
    [
        (AVX512 | {"avx512_bf16", "avx_vnni"}, "x86_64", "avx512-bf16"),
        (AVX512, "x86_64", "avx512-vnni"),
        (AVX2 | {"avx_vnni"}, "x86_64", "avx-vnni"),  # Alder Lake and later client chips
        (AVX2, "x86_64", "avx2"),  # Zen 1-3, Haswell to Comet Lake
        (AVX2 - {"f16c"}, "x86_64", "portable"),
        (frozenset({"fp", "asimd", "asimddp"}), "aarch64", "neon-dotprod"),  # Graviton 2, Apple M1
        (frozenset({"fp", "asimd"}), "aarch64", "portable"),  # Cortex-A72: no dot product
        (AVX512 | {"avx512_bf16"}, "aarch64", "portable"),  # x86 flags mean nothing elsewhere
        (frozenset({"asimd", "asimddp"}), "x86_64", "portable"),
    ],
)
def test_best_tier_from_flags(flags: frozenset[str], machine: str, best: str) -> None:
    assert kernels.choose_tier(None, flags, machine) == best
    assert kernels.runnable_tiers(flags, machine)[-1] == "portable"


def test_cap_gives_the_best_runnable_tier_at_or_below_it() -> None:
    flags = AVX512 | {"avx512_bf16"}
    assert kernels.choose_tier("avx2", flags, "x86_64") == "avx2"
    assert kernels.choose_tier("avx-vnni", flags, "x86_64") == "avx2"  # this CPU lacks AVX-VNNI
    assert kernels.choose_tier("avx512-bf16", AVX2, "x86_64") == "avx2"  # a cap never raises a tier
    assert kernels.choose_tier("portable", flags, "x86_64") == "portable"
    arm = frozenset({"asimd", "asimddp"})
    assert kernels.choose_tier("neon-dotprod", arm, "aarch64") == "neon-dotprod"
    assert kernels.choose_tier("avx2", arm, "aarch64") == "portable"  # another family's tier: portable
    assert kernels.choose_tier("neon-dotprod", flags, "x86_64") == "portable"
    with pytest.raises(ValueError, match="TAILSERVE_CPU_TIER='avx3'"):
        kernels.choose_tier("avx3", flags, "x86_64")


def test_each_tier_builds_with_its_own_flags_into_its_own_folder() -> None:
    folders = {kernels.build_dir(t).name for t in kernels.TIER_NAMES}
    assert len(folders) == len(kernels.TIER_NAMES)
    assert all("native" not in " ".join(kernels._compile_flags(t)) for t in kernels.TIER_NAMES)
    assert "-mavx512bf16" in kernels._compile_flags("avx512-bf16")
    assert not any(f.startswith("-m") for f in kernels._compile_flags("portable"))


def test_tiers_of_a_machine_family_end_with_portable() -> None:
    assert kernels.tiers_of("x86_64") == ["avx512-bf16", "avx512-vnni", "avx-vnni", "avx2", "portable"]
    assert kernels.tiers_of("aarch64") == ["neon-dotprod", "portable"]
    assert kernels.tiers_of("riscv64") == ["portable"]


def test_every_unit_is_compiled_and_keyed(tmp_path: Path) -> None:
    """A build compiles every .cpp of its folder (an older revision's one unit, or several) and its key
    changes with any unit or header, so a stale unit never links with a fresh one."""
    for name in ("capi.cpp", "llama.cpp", "llama.h"):
        (tmp_path / name).write_text("// a\n")
    assert [p.name for p in kernels.sources(tmp_path)] == ["capi.cpp", "llama.cpp"]
    key = kernels._build_key(tmp_path, "avx2")
    for name in ("llama.cpp", "llama.h"):
        (tmp_path / name).write_text("// b\n")
        assert kernels._build_key(tmp_path, "avx2") != key
        key = kernels._build_key(tmp_path, "avx2")


def test_the_kernels_build_as_parallel_units_without_the_whole_cpp_api() -> None:
    """Issue 23: several units (ninja compiles them on every core), none parsing torch/extension.h."""
    assert len(kernels.sources()) >= 2
    for f in kernels.CSRC.glob("*.[ch]*"):
        assert "#include <torch/extension.h>" not in f.read_text(), f.name
