"""Block manager invariants under random workloads: no leak, no double free, shared blocks read-only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailserve.engine.block_manager import BlockManager, BlockTable, PartialHit

BS = 4


def check_invariants(bm: BlockManager, tables: dict[int, tuple[BlockTable, list[int], int]]) -> None:
    refs = [0] * bm.num_blocks
    for table, _, _ in tables.values():
        for b in table.blocks:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    free_ids = list(bm._free) + list(bm._evictable)
    assert len(free_ids) == len(set(free_ids)), "a block is on the free lists twice"
    assert all(refs[b] == 0 for b in free_ids)
    assert bm.num_free_blocks + sum(1 for r in refs if r) == bm.num_blocks
    # A block shared by several tables is full and keyed: nobody can write into it.
    for table, tokens, computed in tables.values():
        for i, b in enumerate(table.blocks):
            if refs[b] > 1:
                assert bm.blocks[b].key is not None and (i + 1) * BS <= computed
                assert bm.blocks[b].token_ids == tuple(tokens[i * BS : (i + 1) * BS])


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "free"]),
        st.integers(0, 7),  # which sequence
        st.integers(1, 12),  # tokens
        st.integers(0, 2),  # which shared prefix
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.booleans())
def test_random_workloads_keep_invariants(ops_: list[tuple[str, int, int, int]], caching: bool) -> None:
    bm = BlockManager(num_blocks=24, block_size=BS, enable_prefix_caching=caching)
    prefixes = [[7] * 9, [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 1, 1, 1, 1, 2, 2, 2, 2]]
    live: dict[int, tuple[BlockTable, list[int], int]] = {}
    for op, sid, n, pre in ops_:
        if op == "add" and sid not in live:
            tokens = prefixes[pre] + [100 + sid] * n
            table = BlockTable()
            hits = bm.lookup(tokens)
            cached = len(hits) * BS
            assert cached < len(tokens)
            partial = bm.lookup_partial(tokens, hits)
            if partial:  # a registered block that continues the hits, never reaching the last token
                k, src = partial.num_tokens, bm.blocks[partial.block_id]
                assert 0 < k < BS and cached + k < len(tokens)
                assert src.token_ids[:k] == tuple(tokens[cached : cached + k])
                assert src.token_ids and src.parent == (bm.blocks[hits[-1]].key if hits else None)
            if bm.allocate(table, len(tokens), hits):
                bm.register_full_blocks(table, tokens, len(tokens))
                live[sid] = (table, tokens, len(tokens))
            else:
                assert table.blocks == []
        elif op == "grow" and sid in live:
            table, tokens, _ = live[sid]
            new = tokens + [200 + sid] * n
            if bm.allocate(table, len(new)):
                bm.register_full_blocks(table, new, len(new))
                live[sid] = (table, new, len(new))
        elif op == "free" and sid in live:
            table, tokens, computed = live.pop(sid)
            bm.register_tail(table, tokens, computed - n % 3)  # its last tokens maybe not computed
            bm.free(table)
        check_invariants(bm, live)
    for table, _, _ in live.values():
        bm.free(table)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hits_share_blocks_and_survive_their_first_owner() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))
    a = BlockTable()
    assert bm.allocate(a, len(tokens), bm.lookup(tokens))
    bm.register_full_blocks(a, tokens, len(tokens))
    bm.free(a)
    b = BlockTable()
    hits = bm.lookup(tokens + [42])
    assert len(hits) == 2
    assert bm.allocate(b, 11, hits)
    assert b.blocks[:2] == hits
    c = BlockTable()
    assert bm.lookup(tokens[:9]) == hits[:2]
    assert bm.allocate(c, 9, bm.lookup(tokens[:9]))
    assert bm.blocks[hits[0]].ref_count == 2
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == bm.num_blocks


def cache(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Compute `tokens` in a table of their own and let go: their full blocks stay cached. Its blocks."""
    table = BlockTable()
    assert bm.allocate(table, len(tokens))
    bm.register_full_blocks(table, tokens, len(tokens))
    blocks = list(table.blocks)
    bm.free(table)
    return blocks


def test_eviction_reuses_cached_blocks_lru_and_forgets_them() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    tok_a = list(range(8))
    cache(bm, tok_a)
    big = BlockTable()
    assert bm.allocate(big, 16)  # needs every block: the cached ones are evicted
    assert bm.evictions == 2
    assert bm.lookup(tok_a + [1]) == []
    assert not bm.allocate(BlockTable(), 1)
    bm.free(big)


def test_last_token_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    t = BlockTable()
    tokens = list(range(8))
    assert bm.allocate(t, 8)
    bm.register_full_blocks(t, tokens, 8)
    assert len(bm.lookup(tokens)) == 1  # the second block holds the last token: it must be recomputed
    bm.free(t)


def test_a_released_tail_is_a_partial_hit_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    tokens, t = list(range(10)), BlockTable()
    assert bm.allocate(t, 10)
    bm.register_full_blocks(t, tokens, 10)
    tail = t.blocks[2]
    bm.register_tail(t, tokens, 10)  # tokens 8 and 9 of the third block
    bm.free(t)
    follow_up = tokens + [77, 78]
    hits = bm.lookup(follow_up)
    assert len(hits) == 2 and bm.lookup_partial(follow_up, hits) == PartialHit(tail, 2)
    assert bm.lookup_partial(tokens[:8] + [8, 5, 5], hits) == PartialHit(tail, 1)  # a match is cut short
    big = BlockTable()
    assert bm.allocate(big, 16)  # evicts it too
    assert bm.lookup_partial(follow_up, []) is None and not bm._heads
    bm.free(big)


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    t = BlockTable()
    bm.allocate(t, 4)
    blocks = list(t.blocks)
    bm.free(t)
    t.blocks = blocks
    with pytest.raises(AssertionError, match="double free"):
        bm.free(t)


def test_partial_hit_continues_the_full_ones_and_is_forgotten_with_its_block() -> None:
    bm = BlockManager(num_blocks=5, block_size=BS)
    a = cache(bm, list(range(12)))
    tok_b = list(range(10)) + [99, 98]  # the first two tokens of a's third block, then its own
    hits = bm.lookup(tok_b)
    assert hits == a[:2]
    assert bm.lookup_partial(tok_b, hits) == PartialHit(a[2], 2)
    # Never the last token: a prompt that ends inside the cached block leaves that one to compute.
    assert bm.lookup_partial(list(range(11)), hits) == PartialHit(a[2], 2)
    # Only after the hits it continues: the same tokens behind another prefix are no hit.
    other = [20, 21, 22, 23, 24, 25, 26, 27, 8, 9, 10, 42]
    assert cache(bm, other[:8]) and len(bm.lookup(other)) == 2
    assert bm.lookup_partial(other, bm.lookup(other)) is None
    bm.min_partial_tokens = 3
    assert bm.lookup_partial(tok_b, hits) is None
    bm.min_partial_tokens = 1
    big = BlockTable()
    assert bm.allocate(big, 20)  # evicts every cached block: no partial hit is left behind
    assert bm.lookup_partial(tok_b, []) is None and not bm._heads
    bm.free(big)
