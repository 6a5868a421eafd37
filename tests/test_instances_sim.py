"""The simulator's instance failure and join run the same scheduler calls as the engine's coordinator."""
import random

import pytest

from scheduler.sim import SimConfig, Simulator, make_cost_model, synthetic


def workload(seed=0):
    rng = random.Random(seed)
    return synthetic(40.0, 3.0, lambda: (rng.randint(32, 256), rng.randint(8, 32)), rng, "poisson")


def run(scheduler, **kw):
    cfg = SimConfig(instances=3, ranks=1, max_num_seqs=8, max_num_batched_tokens=512, block_size=16,
                    kv_blocks=512, max_model_len=4096, **kw)
    sim = Simulator(cfg, scheduler, lambda n: make_cost_model("linear:0.01,0.0003", n), workload())
    steps = {}
    orig = sim.rec.step

    def count(inst, *a):
        steps[inst.idx] = steps.get(inst.idx, 0) + 1
        return orig(inst, *a)
    sim.rec.step = count
    rec = sim.run()
    return rec, steps


@pytest.mark.parametrize("scheduler", ["sbs", "immediate-rr", "immediate-lb"])
def test_failure_requeues_everything_and_a_joiner_takes_work(scheduler):
    base, _ = run(scheduler)
    ids = sorted(r[7] for r in base.requests)
    rec, steps = run(scheduler, failures=[(1.0, 1)], joins=[1.5], detect_s=0.2)
    assert sorted(r[7] for r in rec.requests) == ids          # every request finished exactly once
    assert all(r[6] == "length" for r in rec.requests)
    assert steps.get(3, 0) > 0                                # the joiner (index 3) stepped with work
    late = {r[7]: r[2] - r[0] for r in rec.requests}
    before = {r[7]: r[2] - r[0] for r in base.requests}
    hit = [i for i in ids if late[i] > before[i] + 0.15]      # restarted after the detection delay
    assert hit                                                # the failure delayed someone
    s = rec.summary()
    assert s["completed"] == len(ids) and s["ttft_mean_s"] > base.summary()["ttft_mean_s"]


def test_failures_and_joins_are_colocated_only():
    with pytest.raises(ValueError, match="colocated"):
        Simulator(SimConfig(mode="pd", failures=[(1.0, 0)]), "sbs",
                  lambda n: make_cost_model("linear:0.01,0.0003", n), workload())
