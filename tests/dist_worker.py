"""Run under torchrun by tests/test_distributed.py:
`torchrun --nproc-per-node 2 tests/dist_worker.py MODE ...`."""
import json
import os
import sys

import torch
import torch.distributed as dist


def generate(model_dir, spec_file, out_prefix):
    from engine import LLM, SamplingParams
    spec = json.load(open(spec_file))
    llm = LLM(model_dir, **spec["options"])
    die_at = spec.get("die_at_step")
    if die_at is not None and dist.get_rank() == 1:
        worker, orig, n = llm.engine.worker, llm.engine.worker.step, [0]

        def dying_step(*args):
            n[0] += 1
            if n[0] == die_at:
                os._exit(3)   # a rank that vanishes mid-run, as after a crash
            return orig(*args)
        worker.step = dying_step
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outs = llm.generate(spec["prompts"], params)
    if spec.get("rebalance"):   # every rank asks, as under torchrun; every instance must re-place
        llm.rebalance_experts()
        outs = llm.generate(spec["prompts"], params)
    steps = llm.coordinator.steps if llm.coordinator else []
    with open(f"{out_prefix}.{dist.get_rank()}.json", "w") as f:
        json.dump({"tokens": [o.token_ids for o in outs], "ranks": [o.metrics.rank for o in outs],
                   "finish": [o.finish_reason for o in outs],
                   "idle_steps": sum(1 for s in steps if 0 in s.tokens_per_rank),
                   "eplb": llm.engine.worker.balancer.history if llm.engine.worker.balancer else None,
                   "slots": llm.engine.worker.balancer.layers[0].experts.slot_experts
                   if llm.engine.worker.balancer else None,
                   "uneven_steps": sum(1 for s in steps if len(set(s.tokens_per_rank)) > 1)}, f)


def a2a(out_prefix):
    from engine.ep import ExpertPlacement, TorchAllToAll
    from scheduler.expert_placement import Placement
    dist.init_process_group("gloo")
    rank, E, k, H = dist.get_rank(), 6, 3, 5
    # uneven ownership, and experts 1 and 4 have a copy on each rank
    placement = ExpertPlacement(Placement([[0, 3, 1, 4], [2, 1, 4, 5]]), E)
    ex = TorchAllToAll(placement)
    results = []
    for case, n_tokens in enumerate([(7, 3), (0, 4), (5, 0), (0, 0)]):   # uneven, and empty ranks
        T = n_tokens[rank]
        g = torch.Generator().manual_seed(100 * case + rank)
        x = torch.randn(T, H, generator=g)
        ids = (torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T
               else torch.zeros(0, k, dtype=torch.int64))
        w = torch.rand(T, k, generator=g)
        slots = placement.local_experts(rank)
        seen = []

        class Experts:   # expert e multiplies by (e + 1): the combined result is known in closed form
            @staticmethod
            def compute(rx, slot_ids, rw):   # [M, k] slots (-1: not here) and weights
                seen.append(rx.shape[0])
                logical = torch.tensor(slots)[slot_ids.clamp(min=0)]
                scale = torch.where(slot_ids >= 0, (logical.float() + 1) * rw, torch.zeros_like(rw))
                return rx * scale.sum(1, keepdim=True)
        out, side = ex.run(x, ids, w, Experts, overlap=lambda: 42)
        assert side == 42
        want = (x[:, None, :] * ((ids.float() + 1) * w)[..., None]).sum(1)
        results.append({"T": T, "err": float((out - want).abs().max()) if T else 0.0,
                        "shape_ok": list(out.shape) == [T, H], "received": seen[0]})
    # float8 payloads travel as bytes
    f8 = torch.randn(4, 8).to(torch.float8_e4m3fn)
    back = ex._a2a(f8, [2, 2], [2, 2])
    results.append({"fp8_dtype": str(back.dtype), "fp8_shape": list(back.shape)})
    with open(f"{out_prefix}.{rank}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "generate":
        generate(*sys.argv[2:5])
    elif mode == "a2a":
        a2a(sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()   # a clean exit: gloo aborts a process that leaves mid-connection
