"""Engine-level DP dispatch (Gimbal-style): KV skip, stickiness until overload, KV-gap rule, prefix
affinity, determinism; and the immediate-gimbal global scheduler built on it."""
import random

import pytest

from scheduler.prefix import block_hashes
from scheduler.routing import RoutingParams, RoutingState, ImmediateGimbal, choose_rank
from scheduler.load import RankLoad
from scheduler.request import Request

BS = 16


def load(rank, wpt=0, used=0, total=1000):
    return RankLoad(rank=rank, num_running=0, num_waiting=0, waiting_prefill_tokens=wpt, running_tokens=0,
                    free_kv_blocks=total - used, total_kv_blocks=total, block_size=BS, max_num_seqs=64,
                    max_num_batched_tokens=4096)


def req(i, n=100, session=None, prefix=None):
    toks = list(prefix or []) + [10_000 + i * 1000 + k for k in range(n)]
    return Request(f"r{i}", toks, 8, session_id=session)


def dispatch(r, loads, state, params=None):
    rank = choose_rank(r, loads, state, params)
    state.record(r, rank, BS, params)
    return rank


def test_lowest_token_load_when_kv_is_even():
    loads = [load(0, wpt=500, used=100), load(1, wpt=200, used=150), load(2, wpt=200, used=120)]
    assert choose_rank(req(0), loads, RoutingState()) == 2      # tie on tokens: lower KV use
    loads[2] = load(2, wpt=200, used=150)
    assert choose_rank(req(0), loads, RoutingState()) == 1      # full tie: lower rank id


def test_kv_high_ranks_are_skipped():
    loads = [load(0, wpt=0, used=950), load(1, wpt=5000, used=500), load(2, wpt=6000, used=899)]
    assert choose_rank(req(0), loads, RoutingState()) == 1
    full = [load(0, used=990), load(1, used=950)]                    # all full: the least full
    assert choose_rank(req(0), full, RoutingState()) == 1
    assert choose_rank(req(0), loads, RoutingState(), RoutingParams(kv_high=1.0)) == 1   # KV gap rule
    assert choose_rank(req(0), loads, RoutingState(), RoutingParams(kv_high=1.0, kv_gap=1.0)) == 0


def test_kv_gap_rule():
    loads = [load(0, wpt=0, used=500), load(1, wpt=4000, used=350)]   # KV differs by 0.15 > 0.10
    assert choose_rank(req(0), loads, RoutingState()) == 1
    assert choose_rank(req(0), loads, RoutingState(), RoutingParams(kv_gap=0.2)) == 0


def test_session_sticks_until_its_rank_is_overloaded():
    state = RoutingState()
    loads = [load(0), load(1), load(2)]
    first = dispatch(req(0, session="s"), loads, state)
    assert first == 0
    # The sticky rank fills up with other work; the session stays while the gap is <= 3000 tokens.
    for extra in (1000, 2500, 3000):
        loads[0] = load(0, wpt=extra)
        assert dispatch(req(extra, session="s"), loads, state) == 0
    loads[0] = load(0, wpt=3001)
    assert dispatch(req(1, session="s"), loads, state) == 1           # overloaded: moves, and sticks there
    loads[0] = load(0)
    loads[1] = load(1, wpt=2000)
    assert dispatch(req(2, session="s"), loads, state) == 1
    assert choose_rank(req(3, session="other"), loads, state) == 0
    assert choose_rank(req(4, session="s"), loads, state, RoutingParams(sticky=False)) == 0


def test_prefix_affinity_prefers_the_rank_that_holds_the_prefix():
    state = RoutingState()
    system = [7] * (4 * BS)                                           # a shared 4-block system prompt
    loads = [load(0), load(1, wpt=50), load(2, wpt=80)]
    loads[0] = load(0, wpt=100)
    assert dispatch(req(0, prefix=system), loads, state) == 1
    loads = [load(0), load(1, wpt=1500), load(2)]                     # rank 1 busier, but holds the prefix
    assert choose_rank(req(1, prefix=system), loads, state) == 1
    assert choose_rank(req(2), loads, state) == 0                     # unrelated prompt: least loaded
    loads[1] = load(1, wpt=3000 + 4 * BS + 1)                        # past the bound (hits count too)
    assert choose_rank(req(1, prefix=system), loads, state) == 0
    assert choose_rank(req(1, prefix=system), [load(0), load(1, wpt=1500)], state,
                       RoutingParams(prefix_affinity=False)) == 0


def test_hits_count_in_the_score():
    state = RoutingState()
    system = [7] * (10 * BS)
    state.record(req(0, prefix=system), 1, BS)
    state.record(req(1, prefix=system[:2 * BS]), 0, BS)          # rank 0 took only the first 2 blocks
    chain = block_hashes(req(2, prefix=system).prompt_token_ids, BS, 16)
    assert state.hits(chain, 1, BS) == 10 * BS and state.hits(chain, 0, BS) == 2 * BS
    assert state.affinity(chain) == 1
    # 3100 queued tokens more than rank 0, but 128 more cached tokens: 2972 <= 3000, still affine.
    assert choose_rank(req(2, prefix=system), [load(0), load(1, wpt=3100)], state) == 1
    assert choose_rank(req(2, prefix=system), [load(0), load(1, wpt=3200)], state) == 0
    # No slack (gap 0): affinity holds only where the score net of hits is the lowest, as here.
    p = RoutingParams(sticky_gap_tokens=0)
    assert choose_rank(req(2, prefix=system), [load(0), load(1, wpt=100)], state, p) == 1


def test_deterministic_and_side_effect_free():
    rng = random.Random(0)
    prefixes = [[p] * (3 * BS) for p in range(4)]
    reqs = [req(i, rng.randint(20, 400), session=f"s{rng.randrange(6)}", prefix=rng.choice(prefixes))
            for i in range(200)]
    loads = [[load(r, wpt=rng.randrange(6000), used=rng.randrange(1000)) for r in range(4)] for _ in reqs]

    def run():
        state = RoutingState()
        out = []
        for r, ld in zip(reqs, loads):
            before = (dict(state.sessions), dict(state.prefixes))
            rank = choose_rank(r, ld, state)
            assert (dict(state.sessions), dict(state.prefixes)) == before
            state.record(r, rank, BS)
            out.append(rank)
        return out
    a = run()
    assert a == run() and len(set(a)) > 1


def test_immediate_gimbal_assigns_on_arrival_with_optimistic_load():
    gs = ImmediateGimbal(2, block_size=BS)
    gs.plan(0.0, [load(0), load(1)])
    gs.add_request(req(0, 2000, session="a"), 0.0)                    # -> 0
    gs.add_request(req(1, 2000, session="b"), 0.0)                    # 0 has 2000 queued -> 1
    gs.add_request(req(2, 500, session="a"), 0.0)                     # sticky: within 3000 of rank 1
    assert gs.num_pending() == 3
    plan = gs.plan(0.1, [load(0), load(1)])
    assert {r: [q.request_id for q in v] for r, v in plan.assignments.items()} == {0: ["r0", "r2"], 1: ["r1"]}
    with pytest.raises(TypeError, match="unknown dispatch option"):
        ImmediateGimbal(2, no_such=1)


def test_immediate_gimbal_before_any_report_spreads_work():
    gs = ImmediateGimbal(3, block_size=BS)
    for i in range(6):
        gs.add_request(req(i, 300), 0.0)
    plan = gs.plan(0.0, [load(0), load(1), load(2)])
    assert sorted(len(v) for v in plan.assignments.values()) == [2, 2, 2]
