"""The sliding layers' own KV pool (engine/kv_pools.py), on plain data: what a sequence holds in each
pool as it advances, prefix hits cut back to what the sliding pool still holds, all-or-nothing
allocation across the pools, and how the budget is split."""

from __future__ import annotations

import pytest

from tailserve.engine.block_manager import HOLE, BlockManager, BlockTable
from tailserve.engine.kv_pools import HybridBlockManager, plan_pools

BS, WINDOW = 4, 8


def hybrid(full: int = 64, sliding: int = 16, prefix_cache: bool = True) -> HybridBlockManager:
    return HybridBlockManager(full, sliding, BS, WINDOW, prefix_cache)


def all_free(bm: HybridBlockManager) -> bool:
    return (
        bm.full.num_free_blocks == bm.full.num_blocks and bm.sliding.num_free_blocks == bm.sliding.num_blocks
    )


def advance(bm: HybridBlockManager, table: BlockTable, tokens: list[int], start: int, n: int) -> None:
    """One step of n tokens from `start`: room for them, then the engine's bookkeeping after it."""
    assert bm.allocate(table, start + n)
    bm.register_full_blocks(table, tokens, start + n)


def test_the_sliding_pool_holds_the_window_while_the_full_pool_grows() -> None:
    bm = hybrid(prefix_cache=False)
    table = BlockTable()
    tokens = list(range(100, 300))
    advance(bm, table, tokens, 0, 12)  # a prefill chunk: the sliding pool holds all of it while it runs
    for c in range(12, 200):
        advance(bm, table, tokens, c, 1)
        held = bm.sliding.num_blocks - bm.sliding.num_free_blocks
        assert held <= -(-WINDOW // BS) + 1  # the next query's window (c − 8, c] spans at most 3 blocks
        assert bm.full.num_blocks - bm.full.num_free_blocks == -(-(c + 1) // BS)
        # every block a later query can reach is held, every one before it let go
        first = max(0, c + 1 - WINDOW + 1) // BS
        assert table.sliding.blocks[:first] == [HOLE] * first
        assert HOLE not in table.sliding.blocks[first:]
    bm.free(table)
    assert all_free(bm)
    assert table.sliding.blocks == [] and table.sliding.dropped == 0


def test_a_hit_needs_the_sliding_blocks_of_its_window() -> None:
    bm = hybrid(full=64, sliding=16)
    shared = list(range(10, 50))  # 40 tokens: 10 blocks
    a = BlockTable()
    assert bm.allocate(a, 40)
    bm.register_full_blocks(a, shared, 40)  # keys all 10 in both pools; sliding blocks 0-7 let go
    assert a.sliding.dropped == 8
    bm.free(a)
    assert all_free(bm)  # cached blocks are free to take

    # The whole prefix is a hit: its window (blocks 8, 9) is held.
    assert len(bm.lookup(shared + [7, 7])) == 10
    # A newcomer's fresh blocks evict the oldest cached sliding blocks: 0-7, let go first.
    other = BlockTable()
    assert bm.allocate(other, (16 - 10 + 8) * BS)
    assert bm.sliding.evictions == 8
    # A prefix ending at 20 tokens needs sliding blocks 3, 4 (from position 13): gone, so no hit, though
    # the full pool still holds all of it.
    assert len(bm.full.lookup(shared[:20] + [7, 7])) == 5
    assert bm.lookup(shared[:20] + [7, 7]) == []
    hits = bm.lookup(shared + [7, 7])
    assert len(hits) == 10  # still: its window survived
    bm.free(other)

    b = BlockTable()
    assert bm.allocate(b, 42, hits)
    assert b.blocks[:10] == hits
    assert b.sliding.blocks[:8] == [HOLE] * 8 and b.sliding.dropped == 8
    assert len(b.sliding.keys) == len(b.keys) == 10  # the chain continues past the holes
    bm.register_full_blocks(b, shared + [7, 7], 42)
    bm.free(b)
    assert all_free(bm)


def test_allocation_is_all_or_nothing_across_the_pools() -> None:
    bm = hybrid(full=64, sliding=4, prefix_cache=False)
    table = BlockTable()
    assert not bm.can_allocate(table, 20)  # 5 blocks: the full pool has them, the sliding one not
    assert not bm.allocate(table, 20)
    assert table.blocks == [] and all_free(bm)
    assert bm.allocate(table, 16)
    bm.trim(table, 5)
    assert len(table.blocks) == len(table.sliding.blocks) == 2
    bm.free(table)
    assert all_free(bm)


def test_register_tail_and_partial_hits_are_off_with_two_pools() -> None:
    bm = hybrid()
    table = BlockTable()
    tokens = list(range(30))
    assert bm.allocate(table, 30)
    bm.register_full_blocks(table, tokens, 30)
    bm.register_tail(table, tokens, 30)
    bm.free(table)
    hits = bm.lookup(tokens[:29] + [99])
    assert bm.lookup_partial(tokens[:29] + [99], hits) is None


GEMMA_270M = [(i + 1) % 6 != 0 for i in range(18)]


def test_one_pool_unless_the_model_mixes_sliding_and_full_layers() -> None:
    budget, layer = 1 << 30, 16 << 10
    for sliding in ([False] * 18, [True] * 18):
        plan = plan_pools(sliding, 512, budget, layer, 16, 64, 128)
        assert plan.sliding_blocks == 0 and plan.num_blocks == budget // (18 * layer)
        assert isinstance(plan.block_manager(16, True), BlockManager)
    assert plan_pools([False] * 18, None, budget, layer, 16, 64, 128).sliding_blocks == 0
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        plan_pools(GEMMA_270M, 512, 18 * layer, layer, 16, 64, 128)


def test_the_split_keeps_the_budget_and_never_shrinks_the_full_pool() -> None:
    budget, layer = 1 << 30, 16 << 10
    single = budget // (18 * layer)
    plan = plan_pools(GEMMA_270M, 512, budget, layer, 16, 64, 128)
    assert plan.sliding_blocks == 64 * 33 + 8  # every sequence's window, and one chunk
    assert (plan.num_blocks * 3 + plan.sliding_blocks * 15) * layer <= budget
    assert plan.num_blocks > 3 * single  # Gemma 3 270M: the same GiB holds 3x the context
    assert plan.max_tokens == plan.num_blocks * 16
    assert isinstance(plan.block_manager(16, True), HybridBlockManager)
    # A budget too small for every window: the sliding pool is what one pool would have had.
    small = plan_pools(GEMMA_270M, 512, 400 * 18 * layer, layer, 16, 64, 128)
    assert small.sliding_blocks == 400 and small.num_blocks == 400
    # An unchunked prompt must fit the sliding pool whole: it bounds the sequence then.
    unchunked = plan_pools(GEMMA_270M, 512, 400 * 18 * layer, layer, 16, 64, 32768)
    assert unchunked.max_tokens == 400 * 16
