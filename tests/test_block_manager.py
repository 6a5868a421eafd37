"""BlockManager: paging, prefix-cache hits, reference counts, LRU eviction."""
import pytest

from scheduler.block_manager import BlockManager
from scheduler.request import Request


def req(rid, tokens, max_tokens=4):
    return Request(rid, list(tokens), max_tokens)


def compute_all(bm, r):
    """Admit r and pretend the model computed every token of it (a full prefill)."""
    bm.allocate_prefix(r)
    n = r.remaining_tokens
    bm.append(r, n)
    r.num_computed_tokens += n
    bm.commit(r)


def test_blocks_needed_append_and_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = req("a", range(10))
    assert bm.blocks_needed(r, 10) == 3
    bm.append(r, 10)
    assert len(r.block_table) == 3 and len(set(r.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    r.num_computed_tokens = 10
    assert bm.blocks_needed(r, 2) == 0      # slots 10, 11 fit in the third block
    assert bm.blocks_needed(r, 3) == 1
    slots = [r.block_table[p // 4] * 4 + p % 4 for p in range(10)]
    assert len(set(slots)) == 10
    assert bm.num_appendable_tokens(r) == 2 + 5 * 4
    with pytest.raises(RuntimeError):
        bm.append(r, 2 + 5 * 4 + 1)


def test_prefix_hit_shares_blocks_with_refcounts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = req("a", range(10))
    compute_all(bm, a)
    assert bm.allocate_prefix(a2 := req("a2", range(100, 110))) == 0   # different prompt: miss
    bm.free(a2)
    b = req("b", list(range(10)) + [7, 7, 7])
    hits = bm.allocate_prefix(b)
    assert hits == 8 and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    free_before = bm.num_free_blocks
    bm.free(a)                              # shared blocks stay referenced by b
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    assert bm.num_free_blocks == free_before + 1
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.usage == 0.0


def test_hash_is_chained_over_the_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute_all(bm, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: no hit anywhere.
    assert bm.allocate_prefix(req("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])) == 0
    # Same first block only: one block hit.
    assert bm.allocate_prefix(req("c", [1, 2, 3, 4, 0, 0, 0, 0, 9])) == 4


def test_never_caches_the_whole_prompt():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = req("a", range(8))                  # exactly two full blocks
    compute_all(bm, a)
    assert len([b for b in bm.blocks if b.hash is not None]) == 2
    b = req("b", range(8))
    assert bm.allocate_prefix(b) == 4       # the last token must be computed to get logits
    assert b.remaining_tokens == 4
    c = req("c", range(9))
    assert bm.allocate_prefix(c) == 8 and c.remaining_tokens == 1


def test_freed_blocks_stay_cached_until_a_fresh_block_is_needed():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = req("a", range(9))                  # 2 full hashed blocks + 1 partial
    compute_all(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6          # evictable blocks count as free
    # 3 fresh blocks: 4 clean ones exist (the partial block went back clean), no eviction.
    x = req("x", range(50, 62))
    bm.append(x, 12)
    assert not set(x.block_table) & set(cached)
    assert all(bm.blocks[i].hash is not None for i in cached)
    assert bm.allocate_prefix(b := req("b", range(9))) == 8
    bm.free(b)
    # Now exhaust the clean blocks: the LRU cached blocks are evicted, tail of the chain first.
    y = req("y", range(70, 74))
    bm.append(y, 4)                         # last clean block
    z = req("z", range(80, 84))
    bm.append(z, 4)                         # evicts one cached block
    assert z.block_table == [cached[1]]
    assert bm.blocks[cached[1]].hash is None and bm.blocks[cached[0]].hash is not None
    assert bm.allocate_prefix(c := req("c", range(9))) == 4
    bm.free(c)


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = req("a", range(5)), req("b", range(100, 105))
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)                              # a's cached block is older in the pool
    bm.free(b)
    x = req("x", range(200, 212))
    bm.append(x, 12)                        # 2 clean + 1 eviction
    assert bm.allocate_prefix(req("a2", range(5))) == 0
    assert bm.allocate_prefix(req("b2", range(100, 105))) == 4


def test_reviving_a_cached_block_removes_it_from_the_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = req("a", range(5))
    compute_all(bm, a)
    bm.free(a)
    b = req("b", range(5))
    assert bm.allocate_prefix(b) == 4
    bm.append(b, 1)
    # Only 1 free block left; taking 2 more must fail rather than steal b's cached block.
    assert bm.num_free_blocks == 1
    assert not bm.can_append(b, 1 + 8)
    bm.append(c := req("c", range(9, 13)), 4)
    assert set(c.block_table).isdisjoint(b.block_table)


def test_concurrent_duplicates_keep_one_cached_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = req("a", range(9)), req("b", range(9))
    for r in (a, b):                        # both admitted before either computed: no hits
        assert bm.allocate_prefix(r) == 0
        bm.append(r, 9)
    for r in (a, b):
        r.num_computed_tokens = 9
        bm.commit(r)
    a_table = a.block_table
    bm.free(a)
    bm.free(b)                              # b's duplicate blocks are not cached twice
    assert bm.num_free_blocks == 8 and sum(blk.hash is not None for blk in bm.blocks) == 2
    c = req("c", range(9))
    assert bm.allocate_prefix(c) == 8 and c.block_table == a_table[:2]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req("a", range(9))
    compute_all(bm, a)
    assert all(b.hash is None for b in bm.blocks)
    assert bm.allocate_prefix(req("b", range(9))) == 0
