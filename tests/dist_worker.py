"""Run under torchrun by tests/test_distributed.py: `torchrun --nproc-per-node 2 tests/dist_worker.py MODE ...`."""
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

        def dying_step():
            n[0] += 1
            if n[0] == die_at:
                os._exit(3)   # a rank that vanishes mid-run, as after a crash
            return orig()
        worker.step = dying_step
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outs = llm.generate(spec["prompts"], params)
    steps = llm.engine.steps
    with open(f"{out_prefix}.{dist.get_rank()}.json", "w") as f:
        json.dump({"tokens": [o.token_ids for o in outs], "ranks": [o.metrics.rank for o in outs],
                   "finish": [o.finish_reason for o in outs],
                   "idle_steps": sum(1 for s in steps if 0 in s.tokens_per_rank),
                   "uneven_steps": sum(1 for s in steps if len(set(s.tokens_per_rank)) > 1)}, f)


def a2a(out_prefix):
    from engine.ep import ExpertPlacement, TorchAllToAll
    dist.init_process_group("gloo")
    rank, E, k, H = dist.get_rank(), 6, 3, 5
    placement = ExpertPlacement(E, 2, owner=[0, 1, 1, 0, 1, 1])   # uneven ownership
    ex = TorchAllToAll(placement)
    results = []
    for case, n_tokens in enumerate([(7, 3), (0, 4), (5, 0), (0, 0)]):   # uneven, and empty ranks
        T = n_tokens[rank]
        g = torch.Generator().manual_seed(100 * case + rank)
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.int64)
        w = torch.rand(T, k, generator=g)
        mine = set(placement.local_experts(rank))
        seen = []

        def experts(rx, rid, rw):
            assert all(int(e) in mine for e in rid.flatten()), "token sent to a rank that does not own its expert"
            seen.append(rx.shape[0])
            return rx * (rid.float() + 1) * rw
        out = ex.run(x, ids, w, experts)
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
