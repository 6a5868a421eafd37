"""Global schedulers on synthetic load vectors: balance, bounded holds, determinism, IQR exclusion."""
import random

import pytest

from scheduler.allocation import StepCostModel, choose_decode_rank, iqr_outliers, rank_slots
from scheduler.load import RankLoad
from scheduler.base import StepPlan
from scheduler.registry import make_global_scheduler
from scheduler.request import Request

NAMES = ["immediate-rr", "immediate-lb", "sbs", "adp-balance", "immediate-gimbal"]


def load(rank, running=0, waiting=0, wpt=0, ctx=0, free=1000, total=1000, seqs=64, budget=4096, step=0.05):
    return RankLoad(rank=rank, num_running=running, num_waiting=waiting, waiting_prefill_tokens=wpt,
                    running_tokens=ctx, free_kv_blocks=free, total_kv_blocks=total, block_size=16,
                    max_num_seqs=seqs, max_num_batched_tokens=budget, last_step_time_s=step)


def req(i, n, t=0.0, priority=0):
    return Request(f"r{i}", [i + 1] + [0] * (n - 1), 8, arrival_time=t, priority=priority)


def tokens_per_rank(plan: StepPlan):
    return {r: sum(q.num_tokens for q in v) for r, v in plan.assignments.items()}


def ids(plan: StepPlan):
    return {r: [q.request_id for q in v] for r, v in plan.assignments.items()}


@pytest.mark.parametrize("name", NAMES)
def test_each_name_constructible_and_plans(name):
    gs = make_global_scheduler(name, 4)
    assert gs.name == name and gs.num_pending() == 0
    for i in range(4):
        gs.add_request(req(i, 100), 0.0)
    plan = gs.plan(0.0, [load(r) for r in range(4)])   # idle ranks: every policy hands work over
    assert plan.num_requests == 4 and gs.num_pending() == 0
    assert make_global_scheduler(name, 4, role="decode").num_ranks == 4


def test_unknown_name_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'fifo'.*immediate-rr"):
        make_global_scheduler("fifo", 4)
    with pytest.raises(ValueError, match="bad options for scheduler 'sbs'"):
        make_global_scheduler("sbs", 4, no_such_option=1)
    with pytest.raises(ValueError):
        make_global_scheduler("sbs", 0)
    with pytest.raises(ValueError, match="unknown order"):
        make_global_scheduler("sbs", 4, order="random")


def test_round_robin_assigns_on_arrival_and_hands_over_per_rank():
    gs = make_global_scheduler("immediate-rr", 4)
    for i in range(6):
        gs.add_request(req(i, 10), 0.0)
    # Only ranks 2 and 3 are at a boundary (one instance of a two-instance cluster).
    plan = gs.plan(0.1, [load(2), load(3)])
    assert ids(plan) == {2: ["r2"], 3: ["r3"]}
    assert gs.num_pending() == 4
    assert ids(gs.plan(0.2, [load(0), load(1)])) == {0: ["r0", "r4"], 1: ["r1", "r5"]}


def test_least_load_counts_what_it_sent_since_the_last_report():
    gs = make_global_scheduler("immediate-lb", 3)
    gs.plan(0.0, [load(0, ctx=500), load(1, ctx=100), load(2, ctx=300)])
    for i in range(3):
        gs.add_request(req(i, 250), 0.0)
    plan = gs.plan(0.1, [load(0, ctx=500), load(1, ctx=100), load(2, ctx=300)])
    # rank1 takes 250 (-> 350); then rank2 (300) is lower than rank1 (350); then rank1 again (350 < 550)
    assert ids(plan) == {1: ["r0", "r2"], 2: ["r1"]}


def test_sbs_water_fills_ranks_evenly():
    gs = make_global_scheduler("sbs", 4)
    sizes = [1000, 900, 800, 700, 600, 500, 400, 300]
    for i, n in enumerate(sizes):
        gs.add_request(req(i, n), 0.0)
    plan = gs.plan(0.0, [load(r) for r in range(4)])
    per = tokens_per_rank(plan)
    assert sum(per.values()) == sum(sizes) and len(per) == 4
    assert max(per.values()) - min(per.values()) <= 100   # round robin would give 1600 vs 1000


def test_sbs_avoids_the_rank_that_is_already_full():
    gs = make_global_scheduler("sbs", 4)
    for i in range(3):
        gs.add_request(req(i, 500), 0.0)
    loads = [load(0, waiting=1, wpt=4000), load(1), load(2), load(3)]   # rank 0's next step is full
    plan = gs.plan(0.0, loads)
    assert 0 not in plan.assignments and plan.num_requests == 3


def test_sbs_releases_only_what_ranks_can_start_next_step():
    gs = make_global_scheduler("sbs", 2, fill_fraction=0.5)
    for i in range(10):
        gs.add_request(req(i, 1000), 0.0)
    plan = gs.plan(0.0, [load(0, budget=2048), load(1, budget=2048)])
    # a rank takes requests while its 2048-token budget has room left: 1000 + 1000 + a 48-token
    # first chunk of a third; the other four stay in the buffer, visible and reorderable
    assert plan.num_requests == 6 and gs.num_pending() == 4
    assert sorted(len(v) for v in plan.assignments.values()) == [3, 3]


def test_sbs_aged_request_goes_first_once_a_rank_can_take_it():
    gs = make_global_scheduler("sbs", 2, order="sjf", max_wait_s=0.5)
    big = req(0, 900)
    gs.add_request(big, 0.0)
    full = [load(0, running=64, ctx=10000), load(1, running=64, ctx=9000)]   # no free slot anywhere
    for t in (0.0, 0.2, 0.6):
        assert gs.plan(t, full).num_requests == 0          # waiting for capacity is not a hold
    for i in range(1, 4):
        gs.add_request(req(i, 50), 0.6)                     # shorter, so sjf ranks them first
    one_slot = [load(0, running=63, ctx=10000), load(1, running=64, ctx=9000)]
    assert ids(gs.plan(0.7, one_slot)) == {0: ["r0"]}      # aged: head of the line, not bypassed
    assert gs.num_pending() == 3


def test_sbs_never_holds_a_prompt_no_rank_can_hold():
    gs = make_global_scheduler("sbs", 2)
    gs.add_request(req(0, 100_000), 0.0)                     # 6250 blocks of 16 > 1000 per rank
    assert gs.plan(0.0, [load(0, running=3, ctx=10), load(1, running=3, ctx=10)]).num_requests == 1


def test_sbs_holds_a_small_buffer_when_arrivals_will_fill_the_budgets():
    gs = make_global_scheduler("sbs", 2, hold_steps=2.0, fill_fraction=0.5)
    busy = [load(0, running=10, ctx=5000, budget=1024), load(1, running=10, ctx=5000, budget=1024)]
    gs.observe_step(0.0, 0.05, [10, 10])
    # a steady stream of 200-token requests, 2 per 10 ms: 40 k tokens/s, far more than the budgets
    t, i = 0.0, 0
    while t < 0.02:
        gs.add_request(req(i, 200), t)
        i, t = i + 1, t + 0.005
    assert gs.plan(0.02, busy).num_requests == 0          # held: more is coming within the bound
    assert gs.plan(0.2, busy).num_requests > 0            # the hold bound (2 steps) has passed


def test_sbs_releases_at_once_when_holding_is_pointless():
    gs = make_global_scheduler("sbs", 2, hold_steps=5.0)
    gs.observe_step(0.0, 0.05, [10, 10])
    busy = [load(0, running=10, ctx=5000), load(1, running=10, ctx=5000)]
    gs.add_request(req(0, 100), 0.0)
    assert gs.plan(0.0, busy).num_requests == 1
    gs.add_request(req(1, 100), 10.0)                       # 0.1 req/s: nothing else will come soon
    assert gs.plan(10.0, busy).num_requests == 1


def test_adp_balance_holds_until_every_rank_gets_one_or_timeout():
    gs = make_global_scheduler("adp-balance", 4, timeout_iters=3)
    busy = [load(r, running=5, ctx=1000) for r in range(4)]
    gs.add_request(req(0, 100), 0.0)
    assert [gs.plan(0.1 * k, busy).num_requests for k in range(3)] == [0, 0, 0]
    assert gs.plan(0.3, busy).num_requests == 1           # timeout_iters boundaries passed
    for i in range(1, 5):
        gs.add_request(req(i, 100), 0.4)
    assert gs.plan(0.4, busy).num_requests == 4            # every rank gets one: no hold
    assert len(gs.plan(0.5, busy).assignments) == 0
    gs.add_request(req(9, 100), 0.6)
    idle = [load(0)] + busy[1:]
    assert gs.plan(0.6, idle).num_requests == 1            # an idle rank: nothing is held


def test_no_starvation_under_a_stream_of_short_requests():
    # sjf order keeps preferring short arrivals; the long request must still start within max_wait.
    gs = make_global_scheduler("sbs", 2, order="sjf", max_wait_s=1.0)
    big = req(0, 3000)
    gs.add_request(big, 0.0)
    t, i, released_at = 0.0, 1, None
    while t < 3.0 and released_at is None:
        for _ in range(4):
            gs.add_request(req(i, 500), t)
            i += 1
        loads = [load(0, running=30, ctx=9000, budget=1100), load(1, running=30, ctx=9000, budget=1100)]
        plan = gs.plan(t, loads)
        if any(q is big for v in plan.assignments.values() for q in v):
            released_at = t
        t += 0.05
    assert released_at is not None and released_at <= 1.0 + 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_plans_are_deterministic(name):
    def run():
        rng = random.Random(7)
        gs = make_global_scheduler(name, 8)
        out, t, k = [], 0.0, 0
        for step in range(60):
            for _ in range(rng.randrange(4)):
                gs.add_request(req(k, rng.randrange(50, 3000), t), t)
                k += 1
            group = range(4) if step % 2 else range(4, 8)       # two instances, alternating boundaries
            loads = [load(r, running=rng.randrange(64), wpt=rng.randrange(3000), ctx=rng.randrange(20000),
                          free=rng.randrange(100, 1000)) for r in group]
            out.append(ids(gs.plan(t, loads)))
            gs.observe_step(t, 0.03 + rng.random() * 0.05, [rng.randrange(4096) for _ in group],
                            ranks=list(group))
            t += 0.04
        return out
    assert run() == run()


def test_iqr_outliers_and_decode_rule():
    kv = [0.50, 0.52, 0.48, 0.51, 0.95, 0.49]
    assert iqr_outliers(kv) == {4}
    assert iqr_outliers([0.5, 0.9]) == set()                 # too few ranks to call anything an outlier
    assert iqr_outliers([0.5] * 6) == set()
    cost = StepCostModel()
    loads = [load(r, running=run, free=int((1 - u) * 1000)) for r, (run, u) in
             enumerate([(10, 0.50), (10, 0.52), (12, 0.48), (10, 0.51), (2, 0.95), (10, 0.49)])]
    slots = rank_slots(loads, cost, watermark=0.0)
    best = choose_decode_rank(slots)
    assert best.rank == 5        # rank 4 has the fewest seqs but is a KV outlier; then 10 seqs, lowest KV


def test_sbs_decode_role_and_prefill_skip_iqr_outliers():
    loads = [load(r, running=10, ctx=1000, free=500) for r in range(5)] + [load(5, running=1, free=20)]
    dec = make_global_scheduler("sbs", 6, role="decode")
    dec.add_request(req(0, 100), 0.0)
    assert 5 not in dec.plan(0.0, loads).assignments
    pre = make_global_scheduler("sbs", 6)
    for i in range(3):
        pre.add_request(req(i, 100), 0.0)
    assert 5 not in pre.plan(0.0, loads).assignments


def test_cost_model_fits_known_coefficients():
    m = StepCostModel(decay=1.0)
    rng = random.Random(1)
    for _ in range(300):
        tok, ctx = rng.randrange(1, 8000), rng.randrange(0, 5_000_000)
        m.observe(0.004 + 3e-5 * tok + 2e-9 * ctx, tok, ctx)
    c0, ct, cc = m.coefficients
    assert abs(c0 - 0.004) < 5e-4 and abs(ct - 3e-5) / 3e-5 < 0.02 and abs(cc - 2e-9) / 2e-9 < 0.05


def test_sbs_learns_cost_from_observed_steps():
    gs = make_global_scheduler("sbs", 2)
    for k in range(50):
        tok = [100 + 37 * k % 2000, 50]
        gs.observe_step(0.05 * k, 0.002 + 1e-5 * tok[0], tok, per_rank_context=[0, 0])
    assert abs(gs.cost.coefficients[1] - 1e-5) / 1e-5 < 0.05


def test_adp_balance_queues_per_instance():
    gs = make_global_scheduler("adp-balance", 4, instances=2)
    for i in range(4):
        gs.add_request(req(i, 100), 0.0)                     # round robin over the two instances
    plan = gs.plan(0.0, [load(2), load(3)])
    assert sorted(q.request_id for v in plan.assignments.values() for q in v) == ["r1", "r3"]
    assert set(plan.assignments) <= {2, 3} and gs.num_pending() == 2
    with pytest.raises(ValueError, match="equal instances"):
        make_global_scheduler("adp-balance", 4, instances=3)
    assert make_global_scheduler("sbs", 4, instances=2).num_ranks == 4   # accepted, not needed


def test_sbs_without_adaptation_holds_to_the_bound():
    # adaptive=False: a lone request on a busy group waits for the hold bound (batching prefill into
    # fewer steps trades TTFT for TPOT in colocated serving); an idle rank still takes it at once.
    gs = make_global_scheduler("sbs", 2, adaptive=False, hold_steps=2.0)
    gs.observe_step(0.0, 0.05, [10, 10])
    busy = [load(0, running=10, ctx=5000), load(1, running=10, ctx=5000)]
    gs.add_request(req(0, 100), 0.0)
    assert gs.plan(0.05, busy).num_requests == 0
    assert gs.plan(0.1, busy).num_requests == 1
    gs.add_request(req(1, 100), 0.2)
    assert gs.plan(0.2, [load(0), busy[1]]).num_requests == 1
