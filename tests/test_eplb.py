"""EPLB planning (pure Python) and rebalancing in a single-process engine."""
import random

import pytest

from scheduler import expert_placement as eplb


def skewed_load(E, seed=0):
    rng = random.Random(seed)
    return [rng.paretovariate(1.2) * 100 for _ in range(E)]   # a few very hot experts


@pytest.mark.parametrize("E,W,R", [(64, 8, 0), (64, 8, 8), (256, 32, 32), (16, 4, 4)])
def test_plan_is_complete_and_balances_better_than_contiguous(E, W, R):
    load = skewed_load(E)
    p = eplb.plan(load, W, R)
    flat = [e for row in p.slots for e in row]
    assert len(flat) == E + R and set(flat) == set(range(E))          # every expert placed
    assert all(len(row) == (E + R) // W for row in p.slots)
    assert all(len(set(row)) == len(row) for row in p.slots)          # no copy twice on one rank
    base = eplb.imbalance(eplb.rank_loads(eplb.default_placement(E, W, R), load))
    new = eplb.imbalance(eplb.rank_loads(p, load))
    assert new <= base + 1e-9
    if R:
        assert new < eplb.imbalance(eplb.rank_loads(eplb.plan(load, W, 0), load)) + 1e-9


def test_redundant_copies_go_to_the_hottest_experts():
    load = [1000, 10, 10, 10, 10, 10, 10, 10]
    p = eplb.plan(load, 4, 4)
    reps = p.replicas(8)
    assert len(reps[0]) == 4                                  # one copy per rank, no more
    assert len({slot // 3 for slot in reps[0]}) == 4
    assert eplb.imbalance(eplb.rank_loads(p, load)) < 1.1


def test_coactivation_affinity_breaks_ties():
    # layer 1 expert e co-activates only with expert e of layer 0: the planner keeps them together
    E, W = 8, 2
    prev = [[0, 1, 2, 3], [4, 5, 6, 7]]
    coact = [[100.0 if a == b else 0.0 for b in range(E)] for a in range(E)]
    p = eplb.plan([10.0] * E, W, 0, prev_slots=prev, coactivation=coact, tolerance=1.0)
    assert sorted(p.slots[0]) == [0, 1, 2, 3] and sorted(p.slots[1]) == [4, 5, 6, 7]


def test_plan_rejects_uneven_slots():
    with pytest.raises(ValueError, match="divide evenly"):
        eplb.plan([1.0] * 8, 3, 0)


def test_single_process_rebalance_keeps_greedy_outputs(tmp_path):
    from engine import LLM, SamplingParams
    from reference import make_hf_checkpoint
    make_hf_checkpoint(tmp_path)
    prompts = [list(range(3, 3 + n)) for n in (1, 7, 23)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(tmp_path), kv_block_size=16, num_kv_blocks=64, num_redundant_experts=4)
    before = [o.token_ids for o in llm.generate(prompts, sp)]
    layer = llm.engine.worker.balancer.layers[0]
    assert int(layer.expert_load.sum()) > 0                     # loads were counted while serving
    llm.rebalance_experts()
    after = [o.token_ids for o in llm.generate(prompts, sp)]
    assert before == after
    assert len(llm.engine.worker.balancer.history) == 1
    assert len(layer.experts.slot_experts) == 12
