"""The sliding layers' KV in a pool of their own: a sequence keeps only its windows' blocks there.

A model whose layers all attend to the whole context (Llama), or all slide (Mistral), keeps one pool:
a block id names the same slot in every layer's pool, and one `BlockManager` hands ids out. A model
that mixes the two (Gemma 3: 5 of every 6 layers slide over 512 tokens) would then keep every sliding
layer's KV for the whole context, since a full layer still needs each block. Here the sliding layers
get a second pool with its own ids (`SlidingBlockManager`) and each sequence a second table
(`BlockTable.sliding`), and a sliding block is let go as soon as no window can reach it again: after a
step that leaves `c` tokens computed, every later query is at a position ≥ c and sees positions
> c − window, so the blocks wholly before c − window + 1 go back to the sliding pool (freed: blocks
behind the window are allocated while their chunk runs, then returned, never kept). A sequence then
holds ⌈window / block⌉ + 1 sliding blocks while it decodes, and one prefill chunk's more while it
prefills.

The prefix cache keys the sliding blocks by the same hash chain as the full ones. A cached prefix of
k full blocks is a hit only as far as the sliding pool still holds the blocks the first recomputed
query's window reaches (those from position k·block − window + 1 on); where it does not, the hit is
cut back to the longest prefix whose window's blocks are all there (down to no hit): the step never
reads sliding KV that was let go. Partial-block hits (a cached block's head copied into a fresh block)
are not taken with two pools: the copy would have to happen in both.

`HybridBlockManager` gives the scheduler and engine the one `BlockManager` interface over both pools:
every allocation is all or nothing across them, and a dry sliding pool preempts like a dry full pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailserve.engine.block_manager import HOLE, BlockManager, BlockTable, PartialHit


class SlidingBlockManager(BlockManager):
    """The sliding layers' pool: blocks behind every window are let go (`drop`), and prefix hits
    cover only the window before the first recomputed token (`window_hits`)."""

    def __init__(self, num_blocks: int, block_size: int, window: int, enable_prefix_caching: bool) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window

    def first_needed(self, position: int) -> int:
        """The first block a query at `position` (or later) can attend to."""
        return max(0, position - self.window + 1) // self.block_size

    def drop(self, table: BlockTable, num_computed: int) -> None:
        """Let go of the blocks no later query of the sequence reaches (those before the window of
        position `num_computed`, the next one to compute)."""
        for i in range(table.dropped, min(self.first_needed(num_computed), len(table.blocks))):
            self._release(table.blocks[i])
            table.blocks[i] = HOLE
            table.dropped = i + 1

    def window_hits(self, keys: list[int], token_ids: list[int]) -> list[int] | None:
        """For a prefix of len(keys) cached full blocks (keys: their chain), the cached sliding blocks
        of the window before its end; None when one of them is not held."""
        bs = self.block_size
        ids = []
        for i in range(self.first_needed(len(keys) * bs), len(keys)):
            bid = self._cached.get(keys[i])
            if bid is None or self.blocks[bid].token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                return None
            ids.append(bid)
        return ids

    def allocate_window(self, table: BlockTable, num_tokens: int, keys: list[int], ids: list[int]) -> bool:
        """`allocate` where the prefix hit of len(keys) blocks is held only from its window on: HOLEs
        (with their keys) before it, the window's cached blocks `ids`, then fresh blocks for
        `num_tokens` (growing a table: no keys). All or nothing."""
        holes = len(keys) - len(ids)
        if not self.can_allocate(table, num_tokens, [HOLE] * holes + ids):
            return False
        if holes:
            assert not table.blocks, "hits are taken by an empty table"
            table.blocks.extend([HOLE] * holes)
            table.keys.extend(keys[:holes])
            table.dropped = holes
        return self.allocate(table, num_tokens, ids)


@dataclass(frozen=True)
class PoolPlan:
    """How many blocks each pool has, and the longest sequence they hold."""

    num_blocks: int  # the pool of the layers that do not slide (of every layer, with one pool)
    sliding_blocks: int = 0  # the sliding layers' pool; 0: one pool
    window: int = 0
    max_tokens: int = 0  # tokens one sequence can hold

    def block_manager(self, block_size: int, prefix_cache: bool) -> BlockManager | HybridBlockManager:
        if not self.sliding_blocks:
            return BlockManager(self.num_blocks, block_size, prefix_cache)
        return HybridBlockManager(self.num_blocks, self.sliding_blocks, block_size, self.window, prefix_cache)


def plan_pools(
    sliding: list[bool],
    window: int | None,
    budget: int,
    layer_block_bytes: int,
    block_size: int,
    max_num_seqs: int,
    max_chunk: int,
) -> PoolPlan:
    """Split `budget` bytes of KV between the pools (`layer_block_bytes`: one layer's K and V of one
    block). One pool unless some layers slide and some do not. The sliding pool gets what every
    running sequence's window needs plus one prefill chunk (at most the block count one pool would
    have had, so the full pool never has fewer blocks than before); the full pool gets the rest."""
    layers, n_slide = len(sliding), sum(sliding)
    single = budget // (layers * layer_block_bytes)
    if single < 2:
        raise ValueError(f"a KV budget of {budget} bytes holds fewer than 2 blocks")
    if not window or n_slide in (0, layers):
        return PoolPlan(single, max_tokens=single * block_size)
    per_seq = -(-window // block_size) + 1
    want = max_num_seqs * per_seq + -(-max_chunk // block_size)
    s = min(want, single)
    full = (budget - s * n_slide * layer_block_bytes) // ((layers - n_slide) * layer_block_bytes)
    # One sequence's step needs its window and its chunk in the sliding pool; a longer unchunked
    # prompt could never run, so the sliding pool bounds the sequence then.
    fits = s * block_size >= window + max_chunk + block_size
    return PoolPlan(full, s, window, (full if fits else min(full, s)) * block_size)


class HybridBlockManager:
    """`BlockManager`'s interface over the full-attention pool (`full`: its ids, counts and prefix
    statistics are the ones reported) and the sliding layers' pool (`sliding`, each table's
    `.sliding`)."""

    def __init__(
        self, num_blocks: int, sliding_blocks: int, block_size: int, window: int, enable_prefix_caching: bool
    ) -> None:
        self.full = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sliding = SlidingBlockManager(sliding_blocks, block_size, window, enable_prefix_caching)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = self.full.blocks  # (spec_decode.py's separate draft reads the full pool's keys)

    @staticmethod
    def _s(table: BlockTable) -> BlockTable:
        if table.sliding is None:
            table.sliding = BlockTable()
        return table.sliding

    # --- accounting -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def usage(self) -> float:
        """The fuller pool's share in use: what admission and the load report care about."""
        return max(self.full.usage, self.sliding.usage)

    @property
    def prefix_queries(self) -> int:
        return self.full.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.full.prefix_hits

    @property
    def evictions(self) -> int:
        return self.full.evictions + self.sliding.evictions

    def blocks_needed(self, num_tokens: int) -> int:
        return self.full.blocks_needed(num_tokens)

    # --- prefix cache -----------------------------------------------------------------------------

    def lookup(self, token_ids: list[int]) -> list[int]:
        """The full pool's hits, cut back to the longest prefix whose window the sliding pool holds."""
        hits = self.full.lookup(token_ids)
        keys = [self.full.blocks[b].key for b in hits]
        for k in range(len(hits), 0, -1):
            if self.sliding.window_hits(keys[:k], token_ids) is not None:  # type: ignore[arg-type]
                return hits[:k]
        return []

    def lookup_partial(self, token_ids: list[int], hits: list[int]) -> PartialHit | None:
        return None  # (module docstring)

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.full.record_query(num_tokens, num_hit_tokens)

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Key the computed full blocks in both pools, then let go of the sliding blocks behind the
        window (called after every step with the sequence's new computed count)."""
        self.full.register_full_blocks(table, token_ids, num_computed)
        s = self._s(table)
        self.sliding.register_full_blocks(s, token_ids, num_computed)
        self.sliding.drop(s, num_computed)

    def register_tail(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Nothing: a released tail serves partial hits, which two pools do not take."""

    # --- allocation -------------------------------------------------------------------------------

    def _window(self, hits: list[int]) -> tuple[list[int], list[int]]:
        keys: list[int] = [self.full.blocks[b].key for b in hits]  # type: ignore[misc]
        if not hits:
            return keys, []
        ids = self.sliding.window_hits(keys, self._tokens(hits))
        assert ids is not None, "a hit the sliding pool cannot serve (lookup cuts those back)"
        return keys, ids

    def _tokens(self, hits: list[int]) -> list[int]:
        return [t for b in hits for t in self.full.blocks[b].token_ids]

    def can_allocate(self, table: BlockTable, num_tokens: int, hits: list[int] = ()) -> bool:
        keys, ids = self._window(list(hits))
        holes = [HOLE] * (len(keys) - len(ids))
        return self.full.can_allocate(table, num_tokens, hits) and self.sliding.can_allocate(
            self._s(table), num_tokens, holes + ids
        )

    def allocate(self, table: BlockTable, num_tokens: int, hits: list[int] = ()) -> bool:
        """Both pools' blocks for `num_tokens` tokens (and the hits, for an empty table), or nothing."""
        if not self.can_allocate(table, num_tokens, hits):
            return False
        keys, ids = self._window(list(hits))
        assert self.full.allocate(table, num_tokens, hits)
        assert self.sliding.allocate_window(self._s(table), num_tokens, keys, ids)
        return True

    def free(self, table: BlockTable) -> None:
        self.full.free(table)
        self.sliding.free(self._s(table))

    def trim(self, table: BlockTable, num_tokens: int) -> None:
        self.full.trim(table, num_tokens)
        self.sliding.trim(self._s(table), num_tokens)

    def reset_prefix_cache(self) -> None:
        self.full.reset_prefix_cache()
        self.sliding.reset_prefix_cache()
