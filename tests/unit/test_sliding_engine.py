"""Gemma 3's sliding layers on their own KV pool (engine/kv_pools.py), through the engine, on a tiny
random-weight model (test_families_fused.py's, window 8) on the PyTorch path (blocks of 4) and the
fused step (blocks of 16): greedy output as transformers' with prompts and generations far past the
window, the same batched as one at a time and with the prefix cache as without (a cached prefix
longer than the window, then one whose window was evicted), the same as one pool for every layer
(bitwise on the fused step), a sequence's sliding blocks bounded by its window while its full blocks
grow, and both pools all free after requests finish, are preempted or aborted."""

from __future__ import annotations

import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.block_manager import BlockManager
from tailserve.engine.engine import LLMEngine
from tailserve.engine.kv_pools import HybridBlockManager
from tailserve.engine.model_runner import make_runner
from tailserve.engine.sequence import Status
from tailserve.sampling import SamplingParams
from tests.unit.test_families_fused import TIE, build

transformers = pytest.importorskip("transformers")

WINDOW = 8
NEW = 16
BLOCKS = {"torch": 4, "fused": 16}


def engine(path: str, **options) -> LLMEngine:
    torch_model, fused, _ = build("gemma3")
    options = {"kv_cache_memory": 0.01, "block_size": BLOCKS[path], **options}
    eng = LLMEngine(EngineConfig(model="tiny", **options), torch_model if path == "torch" else fused)
    assert isinstance(eng.block_manager, HybridBlockManager)
    return eng


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def prompts(n: int = 3, shared: int = 0) -> list[list[int]]:
    """Prompts of 25 to 61 tokens (3 to 8 windows), after `shared` common tokens."""
    g = torch.Generator().manual_seed(7)
    common = torch.randint(3, 256, (shared,), generator=g).tolist()
    return [common + torch.randint(3, 256, (m,), generator=g).tolist() for m in (40, 61, 25, 33)[:n]]


def all_free(eng: LLMEngine) -> bool:
    bm = eng.block_manager
    return (
        bm.full.num_free_blocks == bm.full.num_blocks and bm.sliding.num_free_blocks == bm.sliding.num_blocks
    )


def run(eng: LLMEngine) -> dict[str, list[int]]:
    """Step until idle, checking after every step that each running sequence holds its full blocks
    and, once decoding, only its window's sliding blocks."""
    bs = eng.config.block_size
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        for seq in eng.scheduler.running:
            t = seq.table
            assert len(t.blocks) >= -(-seq.num_computed // bs)
            if seq.num_uncomputed == 1 and seq.status is Status.RUNNING:
                assert len(t.sliding.blocks) - t.sliding.dropped <= -(-WINDOW // bs) + 1
    assert all_free(eng)
    return got


def one_at_a_time(eng: LLMEngine, ps: list[list[int]]) -> list[list[int]]:
    outs = []
    for p in ps:
        eng.add_request("r", p, greedy())
        outs.append(run(eng)["r"])
    return outs


def assert_transformers(path: str, ps: list[list[int]], outs: list[list[int]]) -> None:
    """The PyTorch path (fp32) picks transformers' every token; the fused step (bf16 activations) picks
    one within TIE nats of it (test_families_fused.py)."""
    _, _, ref = build("gemma3")
    for p, out in zip(ps, outs):
        with torch.inference_mode():
            logp = ref(torch.tensor([p + out])).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        gap = logp.max(-1).values - logp.gather(1, torch.tensor(out)[:, None])[:, 0]
        assert (gap <= (0 if path == "torch" else TIE)).all(), f"greedy {out} vs transformers' gaps {gap}"


@pytest.mark.parametrize("path", list(BLOCKS))
def test_greedy_past_the_window_is_transformers_and_batch_invariant(path: str) -> None:
    ps = prompts()
    alone = one_at_a_time(engine(path, prefix_cache=False), ps)
    assert_transformers(path, ps, alone)
    together = engine(path, prefix_cache=False, max_num_batched_tokens=12, max_num_seqs=3)
    for i, p in enumerate(ps):
        together.add_request(str(i), p, greedy())
    got = run(together)
    assert [got[str(i)] for i in range(len(ps))] == alone


@pytest.mark.parametrize("path", list(BLOCKS))
def test_prefix_cache_on_is_off_past_the_window(path: str) -> None:
    """A cached prefix of 48 tokens (6 windows) is reused with its window's sliding blocks; once the
    sliding pool has evicted them, the prefix is recomputed (not read from let-go blocks)."""
    ps = prompts(4, shared=48)
    off = one_at_a_time(engine(path, prefix_cache=False), ps)
    on = engine(path)
    bm = on.block_manager
    assert one_at_a_time(on, ps[:3]) == off[:3]
    assert bm.prefix_hits >= 2 * (48 // on.config.block_size) * on.config.block_size
    hits = bm.prefix_hits
    bm.sliding.reset_prefix_cache()  # the sliding pool forgets every cached block
    assert bm.full.lookup(ps[3]) and bm.lookup(ps[3]) == []
    assert one_at_a_time(on, ps[3:]) == off[3:]
    assert bm.prefix_hits == hits


def test_preempted_and_aborted_requests_give_back_both_pools() -> None:
    ps = prompts(4)
    want = one_at_a_time(engine("torch", prefix_cache=False), ps)
    # 60 KiB: 30 full blocks (120 tokens) for four sequences of up to 77: some are preempted.
    tight = engine("torch", kv_cache_memory=60 / (1 << 20), max_num_batched_tokens=12, max_num_seqs=4)
    assert tight.block_manager.full.num_blocks == 30
    for i, p in enumerate(ps):
        tight.add_request(str(i), p, greedy())
    got = run(tight)
    assert tight.scheduler.num_preemptions > 0
    assert [got[str(i)] for i in range(len(ps))] == want

    for i, p in enumerate(ps):
        tight.add_request(f"a{i}", p, greedy())
    for _ in range(12):  # mid-prefill and mid-decode
        tight.step()
    assert not all_free(tight)
    for i in range(len(ps)):
        tight.abort(f"a{i}")
    assert not tight.has_unfinished() and all_free(tight)


def one_pool(eng: LLMEngine) -> LLMEngine:
    """The same engine with every layer's KV in one pool, as before the split: the reference."""
    bm = BlockManager(eng.block_manager.full.num_blocks, eng.config.block_size, eng.config.prefix_cache)
    eng.block_manager = eng.scheduler.bm = bm
    eng.runner = make_runner(eng.model, bm.num_blocks, eng.config.block_size)
    return eng


@pytest.mark.parametrize("path", list(BLOCKS))
def test_two_pools_compute_what_one_pool_does(path: str) -> None:
    """Batched, chunked, from the prefix cache: the same tokens and log-probabilities, to the bit on the
    fused step (each row's numbers depend on its own tokens only); to fp32 rounding on the PyTorch path,
    whose attention shapes follow the chunks (one pool also takes partial-block hits, two do not)."""
    ps = prompts(4, shared=20)
    got = []
    options = {"max_num_batched_tokens": 12, "max_num_seqs": 4}
    for eng in (engine(path, **options), one_pool(engine(path, **options))):
        params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=0)
        outs: dict[str, list] = {}
        for i, p in enumerate(ps):
            eng.add_request(str(i), p, params)
        while eng.has_unfinished():
            for out in eng.step():
                outs.setdefault(out.request_id, []).extend(
                    (t, lp.logprob) for t, lp in zip(out.new_token_ids, out.logprobs)
                )
        got.append(outs)
    if path == "fused":
        assert got[0] == got[1]
    for i in map(str, range(len(ps))):
        assert [t for t, _ in got[0][i]] == [t for t, _ in got[1][i]]
        assert [lp for _, lp in got[0][i]] == pytest.approx([lp for _, lp in got[1][i]], abs=1e-4)
