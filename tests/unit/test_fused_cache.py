"""The packed-weight cache: a saved fused model loads back to the same logits, a second start skips
packing, and a changed model file or precision packs again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tailserve.models.fused import FusedLlama, cached_fused
from tests.tiny import NO_FUSED, TINY, tiny_fused_model

pytestmark = NO_FUSED


def logits(model: FusedLlama) -> np.ndarray:
    shape = model.kv_cache_shape(4, 16)
    k = [np.zeros(shape, np.uint16) for _ in range(TINY.num_layers)]
    v = [np.zeros(shape, np.uint16) for _ in range(TINY.num_layers)]
    return model.compute_logits([5, 9, 33, 2, 7], [[0, 5]], np.arange(4)[None], 16, np.arange(5), k, v)


def test_save_and_load_give_the_same_logits(tmp_path: Path) -> None:
    model = tiny_fused_model(quantization="int4", draft_head=True)
    model.save(tmp_path / "m.pack")
    again = FusedLlama.load(tmp_path / "m.pack")
    assert np.array_equal(logits(again), logits(model))
    assert again.packed.draft_head is not None


def test_cached_fused_packs_once_per_file_and_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAILSERVE_HOME", str(tmp_path / "home"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"stands in for the model file")
    built: list[str] = []

    def build(q: str):
        def make() -> FusedLlama:
            built.append(q)
            return tiny_fused_model(quantization=q)

        return make

    first = cached_fused(source, "int4", False, None, build("int4"))
    second = cached_fused(source, "int4", False, None, build("int4"))
    assert built == ["int4"] and np.array_equal(logits(second), logits(first))
    cached_fused(source, "int8", False, None, build("int8"))  # another precision: packed anew
    source.write_bytes(b"a changed model file")
    cached_fused(source, "int4", False, None, build("int4"))  # another file: packed anew
    assert built == ["int4", "int8", "int4"]
    for f in (tmp_path / "home" / "packed").glob("*.pack"):
        f.write_bytes(b"damaged")
    cached_fused(source, "int4", False, None, build("int4"))  # a damaged cache file is rebuilt
    assert built[-1] == "int4" and len(built) == 4
