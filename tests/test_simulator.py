"""The discrete-event simulator: determinism, conservation, cost models, and SBS against immediate
dispatch."""
import json
import random

import pytest

from scheduler.sim import (LinearCost, RankWork, RooflineCost, SimConfig, Simulator, length_sampler,
                           make_cost_model, simulate, synthetic, trace_workload)
from scheduler.sim.workload import RequestSpec

NAMES = ["immediate-rr", "immediate-lb", "sbs", "adp-balance"]
COST = "linear:0.004,3e-5,1e-9,2e-5"


def workload(seed=0, rate=40.0, duration=5.0, arrival="bursty"):
    rng = random.Random(seed)
    return synthetic(rate, duration, length_sampler("lognormal", rng, 600, 40, sigma=0.8, max_prompt=4000,
                                                    max_output=200), rng, arrival)


def run(specs, name, cost=COST, **cfg):
    sim = Simulator(SimConfig(**cfg), name, lambda n: make_cost_model(cost, n), specs)
    rec = sim.run()
    return rec, sim


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name):
    a, _ = run(workload(3), name, ranks=4, instances=2)
    b, _ = run(workload(3), name, ranks=4, instances=2)
    assert a.requests == b.requests and a.summary() == b.summary()
    c, _ = run(workload(4), name, ranks=4, instances=2)
    assert c.requests != a.requests


@pytest.mark.parametrize("mode", ["colocated", "pd"])
@pytest.mark.parametrize("name", NAMES)
def test_conservation(name, mode):
    specs = workload(1, rate=60)
    rec, sim = run(specs, name, mode=mode, ranks=4, instances=2, decode_ranks=4, decode_instances=1,
                   kv_blocks=400, block_size=16, max_num_batched_tokens=2048)
    ids = [r[7] for r in rec.requests]
    assert len(ids) == len(set(ids)) == len(specs) == rec.arrivals          # every request finishes once
    assert all(r[6] == "length" for r in rec.requests)
    assert sorted(r[5] for r in rec.requests) == sorted(s.max_tokens for s in specs)   # outputs add up
    assert rec.generated == sum(s.max_tokens for s in specs)               # sampled tokens add up
    assert rec.prefilled >= sum(s.prompt_len for s in specs)               # recompute may add some
    for arrival, release, first, finish, *_ in rec.requests:
        assert arrival <= release <= first <= finish
    for inst in sim.instances:                                             # nothing left anywhere
        for rank in inst.ranks:
            bm = rank.sched.block_manager
            assert not rank.sched.has_work and bm.num_free_blocks == bm.num_blocks
    assert sim.gs.num_pending() == 0


def test_rank_order_reaches_every_rank_queue():
    specs = workload(6, rate=80, duration=3)
    keys = []
    rec, sim = run(specs, "immediate-rr", ranks=2,
                   rank_order=lambda bm: keys.append(bm) or (lambda r: r.num_tokens))
    assert len(keys) == 2 and rec.summary()["completed"] == len(specs)


def test_horizon_stops_the_clock_and_reports_unfinished():
    specs = workload(2, rate=80, duration=4)
    rec, _ = run(specs, "sbs", ranks=2, horizon=2.0)
    s = rec.summary()
    assert s["completed"] < len(specs) and s["span_s"] <= 2.0


def test_sbs_beats_immediate_rr_on_bursty_ttft_8_ranks():
    specs = workload(5, rate=60, duration=20)
    rr = run(specs, "immediate-rr", ranks=8, cost="h200-v3")[0].summary()
    sbs = run(specs, "sbs", ranks=8, cost="h200-v3")[0].summary()
    assert sbs["completed"] == rr["completed"] == len(specs)
    assert sbs["ttft_mean_s"] <= rr["ttft_mean_s"]


def test_sbs_beats_immediate_rr_across_instances_pd():
    rng = random.Random(0)
    specs = synthetic(60, 10, length_sampler("lognormal", rng, 1500, 50, max_prompt=8000), rng, "bursty")
    kw = dict(mode="pd", ranks=8, instances=4, decode_ranks=16, cost="h200-v3")
    rr = run(specs, "immediate-rr", **kw)[0].summary()
    sbs = run(specs, "sbs", **kw)[0].summary()
    assert sbs["ttft_mean_s"] < 0.9 * rr["ttft_mean_s"]


def test_linear_cost_from_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"coefficients": {"c0": 0.01, "c_tok": 1e-4, "c_ctx": 0, "c_seq": 1e-3}}))
    m = make_cost_model(f"fitted:{p}", 2)
    t, busy = m.step([RankWork(tokens=100, seqs=2), RankWork()])
    assert t == pytest.approx(0.01 + 1e-2 + 2e-3) and busy[1] == pytest.approx(0.01)
    p.write_text("{}")
    with pytest.raises(ValueError, match="c0 and c_tok"):
        LinearCost.from_json(str(p))
    with pytest.raises(ValueError, match="unknown cost model"):
        make_cost_model("a100-v3", 8)


def test_roofline_model_shapes():
    m = RooflineCost("h800", 32)
    dec = RankWork(tokens=64, seqs=64, sampled=64, decode_ctx=64 * 2000)
    pre = RankWork(tokens=4096, seqs=4, sampled=4, prefill_tokens=4096, prefill_pairs=4 * 1024 * 512)
    t_dec, _ = m.step([dec] * 32)
    t_pre, _ = m.step([pre] * 32)
    t_one, busy = m.step([pre] + [RankWork()] * 31)
    assert 0.005 < t_dec < 0.1 and t_pre > 5 * t_dec            # decode tens of ms, prefill much longer
    # the idle ranks wait for rank 0; at 32 ranks its RDMA sends alone set the all-to-all time
    assert t_one <= t_pre and busy[0] > busy[1]
    m8 = RooflineCost("h200", 8)
    assert m8.step([pre] + [RankWork()] * 7)[0] < m8.step([pre] * 8)[0]
    assert m.kv_blocks(64) > 1000
    with pytest.raises(ValueError, match="does not fit"):
        RooflineCost("h800", 8).kv_blocks(64)


def test_trace_replay_is_compressed_to_the_requested_rate():
    specs = trace_workload("/work/shared/traces/azure_llm_2023_conv.csv", rate=50, duration=20)
    assert 700 < len(specs) < 1300 and specs[-1].arrival_s <= 20
    assert all(s.prompt_len >= 1 and s.max_tokens >= 1 for s in specs)


def test_requests_file_drives_the_simulator(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in [
        {"arrival_s": 0.0, "prompt_len": 100, "max_tokens": 3},
        {"arrival_s": 0.01, "prompt_token_ids": list(range(1, 50)), "max_tokens": 2}]))
    from scheduler.sim import load_requests
    specs = load_requests(str(p))
    assert [s.prompt_len for s in specs] == [100, 49]
    s = simulate(SimConfig(ranks=2), "sbs", COST, specs)
    assert s["completed"] == 2 and s["throughput_tok_s"] > 0


def test_oversized_prompt_is_reported_not_lost():
    specs = [RequestSpec(0.0, 5000, 2), RequestSpec(0.0, 10, 2)]
    rec, _ = run(specs, "immediate-rr", ranks=2, kv_blocks=16, block_size=16)
    reasons = sorted(r[6] for r in rec.requests)
    assert reasons[0].startswith("error") and reasons[1] == "length"


def test_multi_turn_prompts_extend_their_session_history():
    from scheduler.sim import multi_turn
    rng = random.Random(3)
    specs = synthetic(5, 20, length_sampler("lognormal", rng, 50, 10, max_prompt=200), rng, "poisson")
    fresh = iter(range(100, 1 << 40))
    multi_turn(specs, rng, lambda: next(fresh), sessions=4, prefixes=2, prefix_len=16, max_prompt=300)
    last, systems, turns, restarts = {}, set(), 0, 0
    for s in specs:
        p = s.prompt_token_ids
        assert len(p) == s.prompt_len <= 300
        systems.add(tuple(p[:16]))
        prev = last.get(s.session_id)
        if prev is not None:
            hist = prev.prompt_token_ids + [1] * prev.max_tokens
            if p[:len(hist)] == hist:
                turns += 1        # a follow-up: the previous prompt, its answer, then a new message
                assert len(p) > len(hist) and 1 not in p[len(hist):]
            else:
                restarts += 1     # too long: a new conversation from a system prompt
                assert len(hist) + len(p) - 16 > 300
        last[s.session_id] = s
    assert len(systems) == 2 and turns > len(specs) // 2
