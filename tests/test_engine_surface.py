"""The engine's online surface by name: requests, aborts, outputs, step metrics, in every run mode."""
import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.coordinator import Coordinator
from engine.worker import StepStats
from launch.make_checkpoint import make_checkpoint
from model.config import parse_config
from reference import TINY_V3
from scheduler.load import RankLoad

SP = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_checkpoint(str(d), "tiny-v3")
    return str(d)


def load(rank, running=0):
    return RankLoad(rank=rank, num_running=running, num_waiting=0, waiting_prefill_tokens=0,
                    running_tokens=64 * running, free_kv_blocks=64, total_kv_blocks=64, block_size=16,
                    max_num_seqs=8, max_num_batched_tokens=256)


def coordinator(scheduler, **options):
    cfg = EngineConfig(scheduler=scheduler, kv_block_size=16, scheduler_options=options)
    return Coordinator(parse_config(TINY_V3), cfg, None, 512, 64, 2)


@pytest.mark.parametrize("scheduler,options", [("sbs", dict(hold_s=100.0, adaptive=False, fill_fraction=1.0)),
                                               ("immediate-rr", {}), ("immediate-lb", {}),
                                               ("immediate-gimbal", {}), ("adp-balance", {})])
def test_abort_of_a_held_request_never_reaches_a_rank(scheduler, options):
    coord = coordinator(scheduler, **options)
    keep = coord.add_request([5, 6, 7], SP)
    gone = coord.add_request([8, 9, 10], SP)
    busy = [load(0, running=2), load(1, running=2)]
    if scheduler == "sbs":   # both ranks busy and the buffer short of their budgets: held
        assert not coord.plan(busy, [0, 1]).assignments
        assert coord.policy.num_pending() == 2
    coord.abort(gone)
    coord.abort(gone)   # idempotent
    msg = coord.plan([load(0), load(1)], [0, 1])
    released = [s.request_id for v in msg.assignments.values() for s in v]
    assert gone not in released and gone in msg.aborts and msg.aborts.count(gone) == 1
    assert coord.policy.num_pending() == (0 if keep in released else 1)
    changed = coord.collect([([], StepStats(r, 0, 0.01, 0)) for r in (0, 1)], msg, [0, 1])
    assert [o.request_id for o in changed] == [gone] and coord.outputs[gone].finish_reason == "abort"
    for _ in range(3):
        more = coord.plan([load(0), load(1)], [0, 1])
        assert gone not in [s.request_id for v in more.assignments.values() for s in v]


def test_abort_while_running_frees_blocks_and_finishes_at_the_boundary(tiny):
    llm = LLM(tiny, kv_block_size=16, num_kv_blocks=64)
    eng = llm.engine
    a = eng.add_request([5, 6, 7, 8], SP)
    b = eng.add_request(list(range(10, 50)), SP)
    for _ in range(3):
        eng.step()
    bm = eng.worker.scheduler.block_manager
    assert b in eng.worker.live and bm.num_free_blocks < bm.num_blocks
    eng.abort(b)
    eng.abort(b)
    seen = [o for _ in range(2) for o in eng.step() if o.request_id == b]
    assert seen and seen[-1].finish_reason == "abort"
    assert b not in eng.worker.live and all(r.request_id != b for r in eng.worker.scheduler.running)
    n_b = len(eng.outputs[b].token_ids)
    list(eng.stream())
    assert eng.outputs[a].finish_reason == "length" and len(eng.outputs[a].token_ids) == 40
    assert len(eng.outputs[b].token_ids) == n_b < 40 and eng.outputs[b].finish_reason == "abort"
    assert bm.num_free_blocks == bm.num_blocks      # the aborted request's blocks came back
    eng.abort(b)                                      # finished: still a no-op
    assert not eng.has_unfinished()
    assert eng.step_metrics()["steps"] == len(eng.steps) > 0


def test_abort_of_a_buffered_request_in_the_engine(tiny):
    llm = LLM(tiny, kv_block_size=16, num_kv_blocks=64)
    eng = llm.engine
    rid = eng.add_request([5, 6, 7], SP)
    eng.abort(rid)
    changed = list(eng.stream())
    assert [o.finish_reason for o in changed if o.request_id == rid] == ["abort"]
    assert eng.outputs[rid].token_ids == [] and rid not in eng.worker.live
    assert not eng.has_unfinished()


def test_a_rank_without_a_coordinator_says_so(tiny):
    llm = LLM(tiny)
    eng = LLMEngine(llm.engine.worker, None, several=True)
    for call in (lambda: eng.add_request([1, 2]), lambda: eng.abort("x"), lambda: eng.outputs,
                 lambda: eng.step_metrics(), lambda: eng.steps, lambda: eng.take_steps()):
        with pytest.raises(RuntimeError, match="rank 0 holds no coordinator"):
            call()
    eng.request_rebalance()   # under torchrun rank 0's call covers every instance: no error here
    assert eng.has_unfinished()   # several instances: the loop runs until the scheduler stops it


def test_live_sbs_cost_model_fits_the_attention_context(tiny):
    """Ranks report the attention context they computed, so SBS fits the same terms as in the simulator."""
    llm = LLM(tiny, kv_block_size=16, num_kv_blocks=64, max_num_batched_tokens=64)
    cost = llm.coordinator.policy.cost
    prior = cost.coefficients
    llm.generate([list(range(3, 3 + n)) for n in (5, 60, 120)], SamplingParams(temperature=0, max_tokens=8))
    assert cost.num_obs > 0 and cost.coefficients[2] != prior[2]


def test_two_control_plane_exchanges_per_step(tiny):
    from engine.distributed import LocalGroup
    calls = []

    class Counting(LocalGroup):
        def gather(self, obj):
            calls.append("gather")
            return super().gather(obj)

        def broadcast(self, obj):
            calls.append("broadcast")
            return super().broadcast(obj)
    eng = LLM(tiny).engine
    eng.group = Counting()
    rid = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    n = 0
    while eng.has_unfinished():
        eng.step()
        n += 1
    assert len(eng.outputs[rid].token_ids) == 4 and calls == ["gather", "broadcast"] * n
