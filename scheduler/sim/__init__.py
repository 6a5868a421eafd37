"""Discrete-event cluster simulator driving the real scheduler/ code with a step-time cost model."""
from scheduler.sim.cost import LinearCost, RankWork, RooflineCost, make_cost_model
from scheduler.sim.simulator import SimConfig, Simulator
from scheduler.sim.workload import (RequestSpec, load_requests, length_sampler, multi_turn, synthetic,
                                    trace_workload)


def simulate(cfg: SimConfig, scheduler: str, cost_spec: str, specs) -> dict:
    """Run one scheduler over `specs`; returns the metrics summary (see scheduler/sim/metrics.py)."""
    sim = Simulator(cfg, scheduler, lambda n: make_cost_model(cost_spec, n), specs)
    return sim.run().summary()


__all__ = ["SimConfig", "Simulator", "simulate", "RankWork", "LinearCost", "RooflineCost", "make_cost_model",
           "RequestSpec", "load_requests", "length_sampler", "multi_turn", "synthetic", "trace_workload"]
