"""Fixed-size KV blocks: allocation, reference counts, and the hash-chained prefix cache.

A full block whose KV has been computed is keyed by hash(parent key, its token ids); another request
with the same prefix maps the same physical block (read-only: only full blocks are shared, and a
request only ever writes into its own last, partial block). When the last reader lets go, a cached
block is kept on an LRU list and handed out again only when no never-cached block is left.

A prefix rarely ends on a block boundary (a system prompt then a user turn): past its last shared full
block, a request may still match the first tokens of a cached block. `lookup_partial` finds the longest
such match, and the request starts from a fresh block holding a copy of that block's KV (the caller
copies it before the step writes any KV): those tokens are not recomputed. A sequence's last, partial
block is indexed the same way when the sequence lets go of it (`register_tail`), so the next turn of a
conversation, which re-sends all of it, reuses its very end too.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # prefix-cache key while registered
    token_ids: tuple[int, ...] = ()  # cached tokens: all of a keyed block's, or a released tail's head
    parent: int | None = None  # the key of the block before it, while cached


@dataclass(frozen=True)
class PartialHit:
    """The first `num_tokens` tokens of cached block `block_id` continue a request's full-block hits."""

    block_id: int
    num_tokens: int


HOLE = -1  # a table entry whose block was let go (a sliding pool's block behind every window)


@dataclass
class BlockTable:
    """One sequence's view: its physical blocks in order and the keys of its full, computed blocks.

    With the sliding layers' KV in a pool of their own (engine/kv_pools.py), `sliding` is the
    sequence's table in that pool, whose first `dropped` entries are HOLEs: blocks no window reaches."""

    blocks: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    sliding: BlockTable | None = None
    dropped: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, not cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached, oldest first
        self._cached: dict[int, int] = {}  # key -> block id
        # (parent key, a cached block's first j tokens) -> that block, for j a multiple of _head_step
        # below the block size: 3 entries a block at 16, not 15 (a match is then extended token by token)
        self._head_step = max(1, block_size // 4)
        self._heads: dict[tuple[int | None, tuple[int, ...]], int] = {}
        # the least match worth a block copy; a quarter block (4 tokens at 16) saves more than it costs
        self.min_partial_tokens = self._head_step
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found
        self.evictions = 0

    # --- accounting -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache -----------------------------------------------------------------------------

    @staticmethod
    def block_key(parent: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent, token_ids))

    def lookup(self, token_ids: list[int]) -> list[int]:
        """Block ids caching the longest prefix of `token_ids` in full blocks.

        The last token is never a hit: its logits must be computed, so at least one token is left to run.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        n_full = (len(token_ids) - 1) // bs
        hits: list[int] = []
        parent: int | None = None
        for i in range(n_full):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            key = self.block_key(parent, chunk)
            bid = self._cached.get(key)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
            parent = key
        return hits

    def lookup_partial(self, token_ids: list[int], hits: list[int]) -> PartialHit | None:
        """A cached block whose first tokens continue `hits` (lookup's result) in `token_ids`, taking
        as many as the block it finds holds (at least `min_partial_tokens`, never the last token)."""
        if not self.enable_prefix_caching:
            return None
        step, start = self._head_step, len(hits) * self.block_size
        limit = min(self.block_size - 1, len(token_ids) - 1 - start)
        parent = self.blocks[hits[-1]].key if hits else None
        for j in range(limit // step * step, 0, -step):
            bid = self._heads.get((parent, tuple(token_ids[start : start + j])))
            if bid is not None:
                held = self.blocks[bid].token_ids
                while j < min(limit, len(held)) and held[j] == token_ids[start + j]:
                    j += 1
                return PartialHit(bid, j) if j >= self.min_partial_tokens else None
        return None

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry while it waits for room)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Key every block of `table` whose tokens are now all computed, so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = table.keys[-1] if table.keys else None
        for i in range(len(table.keys), num_computed // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            key = self.block_key(parent, chunk)
            block = self.blocks[table.blocks[i]]
            if table.blocks[i] != HOLE and key not in self._cached and block.key is None:
                block.key, block.token_ids, block.parent = key, chunk, parent
                self._cached[key] = block.block_id
                self._index_head(block)
            table.keys.append(key)
            parent = key

    def register_tail(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Index the computed head of `table`'s last, partial block, for a sequence about to let go of
        it (finished, aborted, preempted): whatever re-sends its tokens (a conversation's next turn, a
        recompute) copies them. The block is then kept like a cached one until the LRU evicts it."""
        i, k = divmod(num_computed, self.block_size)
        if not self.enable_prefix_caching or k < self._head_step or len(table.keys) != i:
            return  # (keys short of i: its full blocks are not all keyed, so its parent is unknown)
        block = self.blocks[table.blocks[i]]
        if block.ref_count != 1 or block.token_ids:  # a tail is never shared; nor ever indexed twice
            return
        block.parent = table.keys[i - 1] if i else None
        block.token_ids = tuple(token_ids[i * self.block_size : i * self.block_size + k])
        self._index_head(block)

    def _head_lengths(self, n: int) -> range:
        """The head lengths indexed for a block caching n tokens: every _head_step below the block size."""
        return range(self._head_step, min(n, self.block_size - 1) + 1, self._head_step)

    def _index_head(self, block: Block) -> None:
        for j in self._head_lengths(len(block.token_ids)):
            self._heads[(block.parent, block.token_ids[:j])] = block.block_id

    # --- allocation -------------------------------------------------------------------------------

    def can_allocate(self, table: BlockTable, num_tokens: int, hits: list[int] = ()) -> bool:
        """Whether `table` (plus `hits`, not yet taken) can grow to hold `num_tokens` tokens."""
        need = self.blocks_needed(num_tokens) - len(table.blocks) - len(hits)
        if need <= 0:
            return True
        revived = sum(1 for b in hits if b in self._evictable)
        return need <= self.num_free_blocks - revived

    def allocate(self, table: BlockTable, num_tokens: int, hits: list[int] = ()) -> bool:
        """Take the cached `hits` (for an empty table) and enough fresh blocks for `num_tokens` tokens.

        All or nothing: on False nothing changed.
        """
        if not self.can_allocate(table, num_tokens, hits):
            return False
        for bid in hits:
            self._take(bid)
            table.blocks.append(bid)
            table.keys.append(self.blocks[bid].key)  # type: ignore[arg-type]
        while len(table.blocks) < self.blocks_needed(num_tokens):
            table.blocks.append(self._take(self._pop_free()))
        return True

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks, tail first so the LRU evicts a prefix's end before its start."""
        for bid in reversed(table.blocks[table.dropped :]):
            self._release(bid)
        table.blocks.clear()
        table.keys.clear()
        table.dropped = 0

    def _release(self, bid: int) -> None:
        block = self.blocks[bid]
        assert block.ref_count > 0, f"double free of block {bid}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.token_ids:  # cached: a keyed block or an indexed tail
                self._evictable[bid] = None
            else:
                self._free.append(bid)

    def trim(self, table: BlockTable, num_tokens: int) -> None:
        """Give back the blocks past what `num_tokens` tokens need (e.g. room for rejected guesses).

        Those blocks were never full of computed tokens, so never cached: they go straight back."""
        keep = self.blocks_needed(num_tokens)
        assert keep >= len(table.keys), "trimming would drop a cached block"
        while len(table.blocks) > keep:
            block = self.blocks[table.blocks.pop()]
            assert block.ref_count == 1 and block.key is None, f"block {block.block_id} is shared or cached"
            block.ref_count = 0
            self._free.append(block.block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (e.g. after weights change)."""
        while self._evictable:
            bid, _ = self._evictable.popitem(last=False)
            self._uncache(bid)
            self._free.append(bid)

    def _take(self, bid: int) -> int:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self._evictable.pop(bid, None)
        block.ref_count += 1
        return bid

    def _pop_free(self) -> int:
        if self._free:
            return self._free.popleft()
        bid, _ = self._evictable.popitem(last=False)
        self._uncache(bid)
        self.evictions += 1
        return bid

    def _uncache(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.key is not None and self._cached.get(block.key) == bid:
            del self._cached[block.key]
        for j in self._head_lengths(len(block.token_ids)):
            head = (block.parent, block.token_ids[:j])
            if self._heads.get(head) == bid:
                del self._heads[head]
        block.key, block.token_ids, block.parent = None, (), None
