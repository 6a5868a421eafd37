"""BatchScheduler: chunked prefill, decode priority, admission limits, preemption, conservation."""
import random
from collections import Counter

import pytest

from scheduler import BatchScheduler, BlockManager, Request, RequestStatus


def make(num_blocks=64, block_size=16, *, seqs=8, budget=32, max_len=1024, caching=True, order="fcfs"):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return BatchScheduler(bm, max_num_seqs=seqs, max_num_batched_tokens=budget,
                          max_model_len=max_len, order=order)


def token_for(r):
    # Deterministic per (request, position): a recompute after preemption sees the same sequence.
    return (hash(r.request_id) + r.num_tokens) % 50_000


def step(s):
    batch = s.schedule()
    sampled = {r.request_id: token_for(r) for r, n in batch.items
               if r.num_computed_tokens + n == r.num_tokens}
    return batch, s.update(batch, sampled)


def run_to_end(s, max_steps=10_000):
    for _ in range(max_steps):
        if not s.has_work:
            return
        step(s)
    raise AssertionError("scheduler did not drain")


def test_chunked_prefill_splits_100_tokens_into_32_32_32_4():
    s = make(budget=32)
    r = Request("r", list(range(100)), max_tokens=3)
    s.add(r)
    chunks = []
    for _ in range(4):
        batch = s.schedule()
        chunks.append([n for _, n in batch.items])
        # Offer a token every step: only the step that reaches the last token may append it.
        s.update(batch, {"r": 7})
        assert r.num_output_tokens == (1 if len(chunks) == 4 else 0)
    assert chunks == [[32], [32], [32], [4]]
    assert [n for _, n in s.schedule().items] == [1]   # now a decode


def test_partial_prefill_continues_before_new_admissions():
    s = make(budget=32)
    a, b = Request("a", list(range(100)), 2), Request("b", list(range(500, 510)), 2)
    s.add(a)
    s.add(b)
    plans = [[(r.request_id, n) for r, n in step(s)[0].items] for _ in range(4)]
    assert plans == [[("a", 32)], [("a", 32)], [("a", 32)], [("a", 4), ("b", 10)]]


def test_decodes_are_scheduled_before_prefills():
    s = make(budget=64)
    s.add(Request("a", list(range(5)), max_tokens=5))
    step(s)                                  # a's prefill; a is now decoding
    s.add(Request("b", list(range(100, 120)), max_tokens=5))
    assert [(r.request_id, n) for r, n in s.schedule().items] == [("a", 1), ("b", 20)]


def test_max_num_seqs_is_respected():
    s = make(seqs=2, budget=64)
    reqs = [Request(f"r{i}", list(range(i * 10, i * 10 + 5)), max_tokens=3) for i in range(5)]
    for r in reqs:
        s.add(r)
    batch, _ = step(s)
    assert [r.request_id for r, _ in batch.items] == ["r0", "r1"] and len(s.waiting) == 3
    while s.has_work:
        step(s)
        assert len(s.running) <= 2
    assert all(r.num_output_tokens == 3 for r in reqs)


def two_growing_requests(order="fcfs"):
    # 6 blocks of 4 = 24 slots; two requests each growing to 16 tokens cannot both stay resident.
    s = make(num_blocks=6, block_size=4, seqs=4, budget=32, caching=False, order=order)
    a, b = Request("a", list(range(8)), max_tokens=8), Request("b", list(range(100, 108)), max_tokens=8)
    s.add(a)
    s.add(b)
    for _ in range(100):
        batch, _ = step(s)
        if batch.preempted:
            return s, a, b, batch
    raise AssertionError("no preemption")


def test_preemption_by_recompute_then_completion():
    s, a, b, batch = two_growing_requests()
    assert batch.preempted == [b]            # the most recently admitted one
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and s.waiting[0] is b and b.num_output_tokens > 0
    assert [r for r, _ in batch.items] == [a]   # no re-admission in the same step
    outputs_at_preemption = list(b.output_token_ids)
    run_to_end(s)
    for r in (a, b):
        assert r.is_finished and r.finish_reason == "length" and r.num_output_tokens == 8
    assert b.output_token_ids[:len(outputs_at_preemption)] == outputs_at_preemption
    assert s.block_manager.num_free_blocks == 6


def test_prefix_cache_hit_on_admission():
    s = make(block_size=16, budget=128)
    s.add(Request("a", list(range(40)), max_tokens=2))
    run_to_end(s)
    b = Request("b", list(range(40)) + [9, 9], max_tokens=2)
    s.add(b)
    items = s.schedule().items
    assert b.num_cached_tokens == 32 and items == [(b, 10)]


def test_order_key_admits_by_priority():
    s = make(seqs=1, budget=64, order=lambda r: -r.priority)
    low, high = Request("low", [1, 2, 3], 1, priority=0), Request("high", [4, 5, 6], 1, priority=5)
    s.add(low)
    s.add(high)
    assert [r.request_id for r, _ in s.schedule().items] == ["high"]


@pytest.mark.parametrize("order", ["fcfs", lambda r: -r.priority])
def test_preempted_request_is_readmitted_before_later_arrivals(order):
    s, a, b, _ = two_growing_requests(order)
    c = Request("c", [1, 2, 3], max_tokens=1, priority=9)
    s.add(c)
    assert s.waiting == [b, c]
    while c.status is RequestStatus.WAITING:
        step(s)
        # c never overtakes b
        assert b.status is not RequestStatus.WAITING or c.status is RequestStatus.WAITING
    run_to_end(s)
    assert all(r.num_output_tokens == r.max_tokens for r in (a, b, c))


def test_finish_abort_frees_blocks_and_skips_update():
    s = make(num_blocks=8, block_size=4, budget=64)
    a, b, c = (Request(x, list(range(i * 10, i * 10 + 6)), 5) for i, x in enumerate("abc"))
    for r in (a, b):
        s.add(r)
    batch = s.schedule()
    s.add(c)
    s.finish(a, "abort")                     # running, mid-step
    s.finish(c, "abort")                     # still waiting
    s.finish(c, "stop")                      # idempotent
    assert s.update(batch, {"a": 1, "b": 2}) == []
    assert a.num_output_tokens == 0 and a.finish_reason == "abort" and c.finish_reason == "abort"
    assert s.running == [b] and s.waiting == []
    assert s.block_manager.num_free_blocks == 8 - len(b.block_table)


def test_missing_sampled_token_is_an_error():
    s = make()
    s.add(Request("a", [1, 2, 3], 2))
    with pytest.raises(KeyError, match="a"):
        s.update(s.schedule(), {})


@pytest.mark.parametrize("kw, total", [({"max_len": 10}, 10), ({"num_blocks": 2, "block_size": 4}, 8)])
def test_length_caps_at_max_model_len_and_pool_size(kw, total):
    # A request may never outgrow the pool either: past it, it could only preempt itself forever.
    s = make(**kw)
    s.add(r := Request("r", list(range(6)), max_tokens=100))
    run_to_end(s)
    assert r.finish_reason == "length" and r.num_tokens == total


def test_impossible_requests_raise():
    s = make(num_blocks=4, block_size=16, max_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add(Request("long", list(range(101)), 1))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(Request("big", list(range(65)), 1))
    with pytest.raises(ValueError, match="empty"):
        s.add(Request("empty", [], 1))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add(Request("zero", [1], 0))
    assert not s.has_work
    with pytest.raises(ValueError):
        make(seqs=8, budget=4)
    with pytest.raises(ValueError):
        make(order="lifo")


def test_load_report():
    s = make(num_blocks=10, block_size=4, seqs=4, budget=8)
    s.add(a := Request("a", list(range(12)), 3))
    s.add(Request("b", list(range(50, 55)), 3))
    step(s)                                  # a: 8 of 12 prefilled; b waits
    load = s.load(rank=3)
    assert (load.rank, load.num_running, load.num_waiting) == (3, 1, 1)
    assert load.waiting_prefill_tokens == 4 + 5 and load.running_tokens == a.num_tokens
    assert (load.free_kv_blocks, load.total_kv_blocks) == (8, 10) and load.kv_usage == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(12))
def test_conservation_random_workload(seed):
    rng = random.Random(seed)
    bs = rng.choice([4, 8, 16])
    num_blocks = rng.randint(12, 40)
    max_len = min(num_blocks * bs, 160)
    seqs = rng.randint(1, 6)
    budget = rng.randint(seqs, 48)
    caching = seed % 3 != 0
    order = "fcfs" if seed % 2 else (lambda r: -r.priority)
    s = make(num_blocks, bs, seqs=seqs, budget=budget, max_len=max_len, caching=caching, order=order)
    bm = s.block_manager
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(bs, 48))] for _ in range(3)]
    pending = []
    for i in range(30):
        prefix = rng.choice(prefixes)
        prompt = (prefix + [rng.randrange(1000) for _ in range(rng.randint(1, 30))])[:max_len - 1]
        max_tokens = rng.randint(1, min(20, max_len - len(prompt)))
        pending.append(Request(f"r{i}", prompt, max_tokens, priority=rng.randint(0, 3)))
    all_reqs, finished_ids = list(pending), []
    for _ in range(20_000):
        while pending and rng.random() < 0.5:
            s.add(pending.pop(0))
        if not s.has_work and not pending:
            break
        decoding = {r for r in s.running if r.remaining_tokens == 1}
        batch = s.schedule()
        reqs = [r for r, _ in batch.items]
        assert len(set(reqs)) == len(reqs) and all(n >= 1 for _, n in batch.items)
        assert batch.num_tokens <= budget and len(s.running) <= seqs
        k = sum(r in decoding for r in reqs)
        assert all(r in decoding for r in reqs[:k]) and not any(r in decoding for r in reqs[k:])
        for r, n in batch.items:
            assert r.status is RequestStatus.RUNNING and len(r.block_table) * bs >= r.num_computed_tokens + n
        for r in batch.preempted:
            assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0 and not r.block_table
        assert all(len(set(r.block_table)) == len(r.block_table) for r in s.running)
        refs = Counter(b for r in s.running for b in r.block_table)
        assert all(refs[blk.block_id] == blk.ref_count for blk in bm.blocks)
        assert bm.num_free_blocks == num_blocks - len(refs)
        sampled = {r.request_id: rng.randrange(1000) for r, n in batch.items
                   if r.num_computed_tokens + n == r.num_tokens}
        finished_ids += [r.request_id for r in s.update(batch, sampled)]
    else:
        raise AssertionError("simulation did not drain")
    assert sorted(finished_ids) == sorted(r.request_id for r in all_reqs)   # each exactly once
    for r in all_reqs:
        assert r.is_finished and r.finish_reason == "length" and r.num_output_tokens == r.max_tokens
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0 and not s.running and not s.waiting
    hits = sum(r.num_cached_tokens for r in all_reqs)
    assert hits > 0 if caching else hits == 0   # shared prefixes do hit the cache


def test_request_tokens_slices_prompt_and_outputs():
    from scheduler.request import Request
    r = Request("x", [1, 2, 3], 5)
    r.output_token_ids = [4, 5]
    for a in range(6):
        for b in range(a, 6):
            assert r.tokens(a, b) == r.all_token_ids[a:b]
