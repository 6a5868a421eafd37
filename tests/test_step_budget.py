"""Per-step token budgets (SBS's common level, issue 19): the batch scheduler honours them, SBS
chunks a long prompt to the level of the others, and the engine and the simulator run this code."""
import random

import pytest

from scheduler import BatchScheduler, BlockManager, Request
from scheduler.allocation import water_level
from scheduler.load import RankLoad
from scheduler.registry import make_global_scheduler
from scheduler.sbs import StaggeredBatchScheduler


def _decodes(s):
    return sum(1 for r in s.running if r.remaining_tokens == 1)


def test_rank_never_exceeds_the_budget_it_was_given():
    rng = random.Random(3)
    bm = BlockManager(256, 16, enable_prefix_caching=False)
    s = BatchScheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024)
    reqs = [Request(f"r{i}", [i + 2] * rng.randint(1, 300), rng.randint(1, 6)) for i in range(30)]
    for r in reqs:
        s.add(r)
    chunked = 0
    for _ in range(5000):
        if not s.has_work:
            break
        budget = rng.choice([None, 0, 1, 5, 17, 40, 64, 500])
        decodes = _decodes(s)
        batch = s.schedule(budget)
        cap = 64 if budget is None else max(decodes, min(budget, 64))
        assert batch.num_tokens <= cap
        chunked += sum(1 for r, n in batch.items if n > 1 and r.num_computed_tokens + n < r.num_tokens)
        done = {r.request_id: 7 for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens}
        s.update(batch, done)
    assert not s.has_work and chunked > 0
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    with pytest.raises(ValueError, match="budget"):
        s.schedule(-1)


def test_water_level():
    assert water_level([0, 0, 0, 0], 100) == 25
    assert water_level([7000, 0, 100, 0], 300) == pytest.approx(400 / 3)   # the long rank takes none
    assert water_level([10, 20], 0) == 10
    assert water_level([], 5) == 0


def _load(rank, queued=0, running=0, budget=8192):
    return RankLoad(rank=rank, num_running=running, num_waiting=0, waiting_prefill_tokens=queued,
                    running_tokens=queued, free_kv_blocks=4096, total_kv_blocks=4096, block_size=64,
                    max_num_seqs=256, max_num_batched_tokens=budget)


def test_sbs_chunks_a_long_prompt_to_the_level_of_the_others():
    sbs = StaggeredBatchScheduler(4, chunk_factor=0.5)   # prior cost: min chunk 250 tokens
    long = Request("long", [5] * 7000, 4)
    short = [Request(f"s{i}", [i + 10] * 600, 4) for i in range(3)]
    for r in [long] + short:
        sbs.add_request(r, 0.0)
    plan = sbs.plan(0.0, [_load(i) for i in range(4)])
    assert plan.num_requests == 4
    budgets = set(plan.budgets.values())
    assert len(budgets) == 1                       # one common level for the group
    level = budgets.pop()
    assert 600 <= level < 7000                     # the long prompt goes in chunks of the others' size
    # Next boundary: the long prompt's rank still has most of it queued; the level follows the others.
    where = next(rank for rank, reqs in plan.assignments.items() if long in reqs)
    loads = [_load(i, queued=7000 - level if i == where else 0) for i in range(4)]
    nxt = sbs.plan(0.1, loads)
    assert set(nxt.budgets.values()) == {sbs.min_chunk(8192)}
    # Baselines and level=False give no budgets (each rank's own maximum, today's behaviour).
    rr = make_global_scheduler("immediate-rr", 4)
    rr.add_request(Request("x", [1] * 10, 1), 0.0)
    assert rr.plan(0.0, [_load(i) for i in range(4)]).budgets is None
    off = StaggeredBatchScheduler(4, level=False)
    off.add_request(Request("y", [1] * 10, 1), 0.0)
    assert off.plan(0.0, [_load(i) for i in range(4)]).budgets is None
    with pytest.raises(ValueError):
        StaggeredBatchScheduler(4, chunk_factor=0)


def test_simulator_runs_the_budgets_and_ranks_stay_under_them(monkeypatch):
    """The simulator drives the real SBS and BatchScheduler: every step, each rank stays under the
    budget the plan gave it, and a long prompt is prefilled over several steps."""
    from scheduler.sim import RequestSpec, SimConfig, Simulator, make_cost_model
    seen = {"checked": 0, "limited": 0}
    orig = BatchScheduler.schedule

    def checked(self, budget=None):
        decodes = _decodes(self)
        batch = orig(self, budget)
        if budget is not None:
            seen["checked"] += 1
            seen["limited"] += budget < self.max_num_batched_tokens
            assert batch.num_tokens <= max(budget, decodes)
        seen.setdefault("r0", []).extend(n for r, n in batch.items if r.request_id == "r0" and n > 1)
        return batch
    monkeypatch.setattr(BatchScheduler, "schedule", checked)
    specs = [RequestSpec(0.0, 6000, 2)] + [RequestSpec(0.001 * i, 300, 2) for i in range(1, 40)]
    cfg = SimConfig(mode="pd", ranks=4, decode_ranks=4, kv_blocks=2048, max_num_batched_tokens=8192)
    sim = Simulator(cfg, "sbs", lambda n: make_cost_model("linear:0.02,1e-4", n), specs)
    assert isinstance(sim.gs, StaggeredBatchScheduler)
    rec = sim.run()
    assert len(rec.requests) == 40 and all(r[6] == "length" for r in rec.requests)
    assert seen["checked"] > 0 and seen["limited"] > 0
    # the 6000-token prompt could have gone in one step of 8192; it was prefilled in several chunks
    assert len(seen["r0"]) > 1 and sum(seen["r0"]) == 6000


def test_engine_prefill_over_several_steps_gives_the_same_tokens(tmp_path):
    """Engine level, tiny model: a plan that gives the rank 8 tokens a step makes a 60-token prompt
    prefill in 8 chunks; the greedy tokens are those of one 2048-token chunk."""
    from reference import make_hf_checkpoint

    from engine import LLM, SamplingParams
    make_hf_checkpoint(tmp_path)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[(i * 11) % 200 + 2 for i in range(60)], [3, 4, 5]]
    whole = LLM(str(tmp_path), kv_block_size=16, num_kv_blocks=64).generate(prompts, greedy)
    llm = LLM(str(tmp_path), kv_block_size=16, num_kv_blocks=64, scheduler="sbs")
    policy = llm.coordinator.policy
    assert isinstance(policy, StaggeredBatchScheduler)   # the simulator's class, same code
    plan = policy.plan

    def small_steps(now, loads):
        p = plan(now, loads)
        p.budgets = {ld.rank: 8 for ld in loads}
        return p
    policy.plan = small_steps
    outs = llm.generate(prompts, greedy)
    steps = llm.coordinator.steps
    assert max(max(s.tokens_per_rank) for s in steps) <= 8
    assert len(steps) >= (60 + 3) // 8 + 5
    assert [o.token_ids for o in outs] == [o.token_ids for o in whole]


def test_an_instance_takes_its_share_of_a_burst_while_another_is_busy():
    sbs = StaggeredBatchScheduler(8)
    sbs.add_request(Request("first", [1] * 400, 2), 0.0)
    assert sbs.plan(0.0, [_load(i) for i in range(4, 8)]).num_requests == 1   # instance B now busy
    for i in range(40):
        sbs.add_request(Request(f"b{i}", [i + 2] * 500, 2), 0.01)
    plan = sbs.plan(0.02, [_load(i) for i in range(4)])                      # instance A at a boundary
    took = sum(r.num_tokens for v in plan.assignments.values() for r in v)
    assert 0.3 * 20000 <= took <= 0.7 * 20000     # about its half; B takes the rest at its boundary
    assert sbs.num_pending() > 0
    nxt = sbs.plan(0.05, [_load(i, running=1) for i in range(4, 8)])
    assert nxt.num_requests > 0
