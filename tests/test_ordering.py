"""Request ordering: SJF / priority order, the aging wait bound, the per-session output predictor."""
import random

import pytest

from scheduler.batch import BatchScheduler
from scheduler.block_manager import BlockManager
from scheduler.ordering import JobPredictor, make_order
from scheduler.request import Request


def req(i, prompt, max_tokens=8, t=0.0, priority=0, session=None):
    return Request(f"r{i}", [i + 1] * prompt, max_tokens, arrival_time=t, priority=priority,
                   session_id=session)


def ids(reqs):
    return [r.request_id for r in reqs]


def test_sjf_orders_by_predicted_work_and_plugs_into_batch_scheduler():
    o = make_order("sjf", decode_weight=1.0, aging_rate=0.0)
    rs = [req(0, 300, 10), req(1, 50, 10), req(2, 120, 10), req(3, 50, 400)]
    assert ids(sorted(rs, key=o.as_key())) == ["r1", "r2", "r0", "r3"]   # r3: short prompt, long output
    bs = BatchScheduler(BlockManager(200, 16), max_num_seqs=8, max_num_batched_tokens=4096,
                        max_model_len=4096, order=make_order("sjf").as_key())
    for r in rs[:3]:
        bs.add(r)
    assert ids(r for r, _ in bs.schedule().items) == ["r1", "r2", "r0"]


def test_priority_order_and_aging():
    o = make_order("priority", aging_rate=1.0)
    rs = [req(0, 10, priority=0, t=5.0), req(1, 10, priority=5, t=5.0), req(2, 10, priority=2, t=5.0)]
    assert ids(sorted(rs, key=o.as_key())) == ["r1", "r2", "r0"]
    old = req(3, 10, priority=0, t=-1.0)               # waited 6 s more: 0 + 6 > 5
    assert ids(sorted(rs + [old], key=o.as_key()))[0] == "r3"
    assert o.key(old, 5.0) < o.key(rs[1], 5.0)
    assert ids(sorted(rs, key=make_order("fcfs").as_key())) == ["r0", "r1", "r2"]


def test_now_free_key_gives_the_same_order_as_key_at_now():
    rng = random.Random(0)
    rs = [req(i, rng.randint(1, 500), rng.randint(1, 300), t=rng.uniform(0, 50), priority=rng.randint(0, 9))
          for i in range(200)]
    for o in (make_order("sjf", aging_rate=37.0), make_order("priority", aging_rate=0.3)):
        for now in (50.0, 80.0, 1e4):
            assert ids(sorted(rs, key=lambda r: o.key(r, now))) == ids(sorted(rs, key=o.as_key()))


def test_unknown_order_and_bad_options():
    with pytest.raises(ValueError, match="unknown order"):
        make_order("random")
    with pytest.raises(ValueError, match="bad options"):
        make_order("fcfs", aging_rate=1.0)
    with pytest.raises(ValueError):
        make_order("sjf", aging_rate=-1)


# ---- the wait bound, on the server model of the proof ----------------------------------------------
def serve(jobs, order):
    """One unit-speed non-preemptive server, smallest key(req, now) first. jobs: [(req, size)] sorted
    by arrival. Returns {request_id: start time}."""
    start, queue, t, i = {}, [], 0.0, 0
    while i < len(jobs) or queue:
        if not queue and jobs[i][0].arrival_time > t:
            t = jobs[i][0].arrival_time
        while i < len(jobs) and jobs[i][0].arrival_time <= t:
            queue.append(jobs[i])
            i += 1
        j = min(queue, key=lambda js: order.key(js[0], t))
        queue.remove(j)
        start[j[0].request_id] = t
        t += j[1]
    return start


def stream(seed, rate, horizon, long_at=20.0, long_size=30.0):
    """Short jobs (0.2..1.8 s of service, random arrivals at `rate`) and one long job at `long_at`.
    A job of s seconds has a prompt of 100*s tokens (sjf with decode_weight=0 costs 100 per second)."""
    rng = random.Random(seed)
    sizes, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < horizon:
        sizes.append((t, rng.uniform(0.2, 1.8)))
    sizes.append((long_at, long_size))
    sizes.sort()
    return [(req(k, max(1, round(100 * s)), 1, t=a), round(100 * s) / 100) for k, (a, s) in enumerate(sizes)]


def bound_terms(jobs, start, order, rho):
    """Per job: U(A_j-) + Work(A_j, A_j + C/a], and sigma + rho*C/a for the realized stream."""
    base = [order.base(r) for r, _ in jobs]
    window = (max(base) - min(base)) / order.aging_rate
    # sigma = max over windows [s, t] of Work[s, t] - rho * (t - s), evaluated at arrival instants.
    sigma, low, cum = 0.0, float("inf"), 0.0
    for r, s in jobs:
        low = min(low, cum - rho * r.arrival_time)
        cum += s
        sigma = max(sigma, cum - rho * r.arrival_time - low)
    out = {}
    for r, _ in jobs:
        a = r.arrival_time
        left = sum(s if start[q.request_id] >= a else max(0.0, start[q.request_id] + s - a)
                   for q, s in jobs if q.arrival_time < a)
        later = sum(s for q, s in jobs if a < q.arrival_time <= a + window)
        out[r.request_id] = (left + later, sigma + rho * window)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aging_bounds_every_wait_and_long_job_starves_without_it(seed):
    # Overloaded stream of short jobs (1.3/s of ~1 s jobs) with a long job at t=50: the queue never
    # drains while the stream lasts, so without aging the long job waits for the whole stream.
    jobs = stream(seed, rate=1.3, horizon=600.0, long_at=50.0)
    sjf = make_order("sjf", decode_weight=0.0, aging_rate=0.0)
    assert serve(jobs, sjf)["r" + str(_long(jobs))] > 600
    aged = make_order("sjf", decode_weight=0.0, aging_rate=100.0)            # C/a = 29.8 s
    start = serve(jobs, aged)
    terms = bound_terms(jobs, start, aged, rho=0.99)
    for r, _ in jobs:
        assert start[r.request_id] - r.arrival_time <= terms[r.request_id][0] + 1e-9   # W <= U + Work(window)
    assert start["r" + str(_long(jobs))] - 50.0 < 120


@pytest.mark.parametrize("seed", [3, 4])
def test_wait_bound_below_capacity(seed):
    # Below capacity (load ~0.8 with bursts): W_j <= sigma + rho * C/a for every job, as proven.
    jobs = stream(seed, rate=0.8, horizon=400.0)
    aged = make_order("sjf", decode_weight=0.0, aging_rate=50.0)
    start = serve(jobs, aged)
    for rho in (0.9, 0.97):
        terms = bound_terms(jobs, start, aged, rho)
        for r, _ in jobs:
            w = start[r.request_id] - r.arrival_time
            assert w <= terms[r.request_id][0] + 1e-9 and w <= terms[r.request_id][1] + 1e-9


def test_priority_aging_bound():
    # Overloaded stream, priorities in [0, 9], a = 0.5/s: a priority-0 request is never passed by
    # anything arriving more than 18 s after it, so it starts within U(A_j) + Work(A_j, A_j + 18].
    rng = random.Random(5)
    jobs, t = [], 0.0
    while (t := t + rng.expovariate(1.3)) < 400:
        jobs.append((req(len(jobs), 10, t=t, priority=rng.randint(1, 9)), 1.0))
    jobs.append((req(len(jobs), 10, t=50.0, priority=0), 1.0))
    jobs.sort(key=lambda js: js[0].arrival_time)
    low = len(jobs) - 1
    o = make_order("priority", aging_rate=0.5)
    start = serve(jobs, o)
    terms = bound_terms(jobs, start, o, rho=0.99)
    assert all(start[r.request_id] - r.arrival_time <= terms[r.request_id][0] + 1e-9 for r, _ in jobs)
    assert start[f"r{low}"] - 50.0 < 90
    assert serve(jobs, make_order("priority", aging_rate=0.0))[f"r{low}"] > 390   # starves without aging


def _long(jobs):
    return max(range(len(jobs)), key=lambda k: jobs[k][1])


# ---- per-session predictor -------------------------------------------------------------------------
def done(i, session, outputs, max_tokens=1000):
    r = req(i, 10, max_tokens, session=session)
    r.output_token_ids = [0] * outputs
    return r


def test_predictor_learns_per_session_and_feeds_sjf():
    p = JobPredictor(window=4)
    assert p.predict(req(0, 10, 500, session="a")) == 500          # nothing seen: max_tokens
    for i, n in enumerate([10, 12, 14]):
        p.observe(done(i, "a", n))
    p.observe(done(9, "b", 900))
    assert p.predict(req(1, 10, 500, session="a")) == pytest.approx(12)
    assert p.predict(req(2, 10, 500, session="b")) == 500          # capped at max_tokens
    assert p.predict(req(3, 10, 2000, session="new")) == pytest.approx((36 + 900) / 4)   # global mean
    for i in range(10):                                              # the window forgets old lengths
        p.observe(done(20 + i, "a", 100))
    assert p.predict(req(4, 10, 500, session="a")) == pytest.approx(100)
    o = make_order("sjf", decode_weight=1.0, predictor=p)
    chatty, terse = req(5, 50, 1000, session="b"), req(6, 50, 1000, session="a")
    assert ids(sorted([chatty, terse], key=o.as_key())) == ["r6", "r5"]


def test_sjf_counts_only_uncached_prompt_tokens():
    from scheduler.ordering import prefix_hits
    bm = BlockManager(100, 16)
    history = list(range(1000, 1000 + 40 * 16))                     # a 640-token conversation so far
    first = Request("h", history, 1)
    bm.allocate_prefix(first)
    bm.append(first, len(history))
    first.num_computed_tokens = len(history)
    bm.commit(first)
    bm.free(first)                                                   # cached, evictable
    hits = prefix_hits(bm)
    turn = Request("turn", history + [5] * 50, 8, arrival_time=1.0)  # 690 tokens, 640 cached
    fresh = Request("fresh", [7] * 200, 8, arrival_time=0.0)
    assert hits(turn) == 640 and hits(fresh) == 0
    assert ids(sorted([fresh, turn], key=make_order("sjf", aging_rate=0.0).as_key())) == ["fresh", "turn"]
    key = make_order("sjf", aging_rate=0.0, cached=hits).as_key()
    assert ids(sorted([fresh, turn], key=key)) == ["turn", "fresh"]
    assert prefix_hits(BlockManager(100, 16, enable_prefix_caching=False))(turn) == 0
