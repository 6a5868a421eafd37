"""Paged KV block accounting with prefix caching.

Only bookkeeping lives here: which physical block ids a request owns. The engine turns a block
table into slots (`block_table[p // block_size] * block_size + p % block_size`); the simulator
never touches tensors at all.

Prefix caching: every FULL block whose KV has been computed gets its prefix hash (scheduler/prefix.py);
blocks are reference counted and shared; a free hashed block waits in an LRU pool until a fresh block
is needed and no never-hashed one is left.
"""
from collections import OrderedDict, deque
from dataclasses import dataclass

from scheduler.prefix import ROOT_HASH, hashed_blocks
from scheduler.request import Request


def slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions start..end-1 of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None              # set once the block is full and its KV computed
    token_ids: tuple[int, ...] = ()      # kept to reject 64-bit hash collisions on lookup


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self._clean: deque[int] = deque(range(num_blocks))      # free, no hash: use these first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, hashed; oldest first

    # ---- capacity ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        # Cached blocks nobody references are free: they can be evicted on demand.
        return len(self._clean) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_append(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def num_appendable_tokens(self, req: Request) -> int:
        """Most new tokens `req` could take now: slack in its last block plus all free blocks.
        (Extension of the contract: lets the scheduler shrink a prefill chunk instead of preempting.)"""
        capacity = (len(req.block_table) + self.num_free_blocks) * self.block_size
        return max(0, capacity - req.num_computed_tokens)

    # ---- allocation --------------------------------------------------------------------------
    def cached_blocks(self, req: Request) -> list[int]:
        """The cached blocks matching the head of req's tokens (a read-only lookup)."""
        found = []
        if self.enable_prefix_caching:
            # Stop one token short of the end: the model must compute >= 1 token to produce logits.
            for chunk, h in hashed_blocks(req.all_token_ids, self.block_size):
                block_id = self.hash_to_block.get(h)
                if block_id is None or self.blocks[block_id].token_ids != chunk:
                    break
                found.append(block_id)
        return found

    def allocate_prefix(self, req: Request) -> int:
        """Attach cached blocks matching the head of req's tokens; returns the hit token count."""
        assert not req.block_table and req.num_computed_tokens == 0, "allocate_prefix on a fresh request only"
        req.block_table = self.cached_blocks(req)
        for block_id in req.block_table:
            self._ref(block_id)
        hits = len(req.block_table) * self.block_size
        req.num_computed_tokens = req.num_cached_tokens = hits
        return hits

    def append(self, req: Request, num_new_tokens: int) -> None:
        """Grow req.block_table to cover num_computed_tokens + num_new_tokens."""
        needed = self.blocks_needed(req, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"{req.request_id}: needs {needed} blocks, {self.num_free_blocks} free")
        for _ in range(needed):
            req.block_table.append(self._take_fresh())

    def commit(self, req: Request) -> None:
        """After num_computed_tokens advanced: hash the blocks that just became full."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        # Full blocks are hashed in order, so walk back to the last hashed one (O(1) per decode).
        first = num_full
        while first > 0 and self.blocks[req.block_table[first - 1]].hash is None:
            first -= 1
        if first == num_full:
            return
        parent = self.blocks[req.block_table[first - 1]].hash if first else ROOT_HASH
        new = hashed_blocks(req.all_token_ids, self.block_size, num_full, first, parent)
        for i, (chunk, h) in enumerate(new, first):
            block = self.blocks[req.block_table[i]]
            block.token_ids, block.hash = chunk, h
            # Two requests may have computed the same prefix concurrently: the first one stays
            # the cached copy; this duplicate keeps its hash only to chain its own successors.
            self.hash_to_block.setdefault(block.hash, block.block_id)

    def free(self, req: Request) -> None:
        """Drop req's references. Tail blocks go into the LRU pool first, so they are evicted
        before the shared heads of the chain."""
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count:
                continue
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                self._evictable[block_id] = None
            else:
                self._reset(block)
                self._clean.append(block_id)
        req.block_table = []

    # ---- internals ---------------------------------------------------------------------------
    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]   # revived: no longer a candidate for eviction
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if self._clean:
            block_id = self._clean.popleft()
        else:
            # Evict the least recently freed cached block; its prefix is forgotten.
            block_id, _ = self._evictable.popitem(last=False)
            del self.hash_to_block[self.blocks[block_id].hash]
            self._reset(self.blocks[block_id])
        self.blocks[block_id].ref_count = 1
        return block_id

    @staticmethod
    def _reset(block: Block) -> None:
        block.hash = None
        block.token_ids = ()
