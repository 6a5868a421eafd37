"""Does the simulator, on a cost model fitted to this machine, predict the real engine?

    python -m bench.validate_sim --model .cache/small-v3 --cost bench/fitted_cpu_small_v3.json

One seeded workload (Poisson arrivals, prompts uniform in [64, 512] tokens, outputs uniform in
[16, 64]) goes (a) through the real engine online, one process, replayed in real time by
bench.serving.serve, and (b) through the simulator with `fitted:FILE` and one rank, with the engine's
batch limits and KV pool. Prints TTFT mean/P50 and throughput side by side with the relative error of
the prediction, per scheduler. Also prints the cost model's error on the very batches the engine ran
(predicted vs measured busy time), which separates step-cost error from scheduling-dynamics error.
"""
import argparse
import json
import random
import sys

from bench.fit_cost import predict
from bench.serving import serve
from scheduler.allocation import attention_pairs
from scheduler.sim import SimConfig, make_cost_model, synthetic
from scheduler.sim.simulator import Simulator

KEYS = [("ttft_mean_s", "TTFT mean ms", 1e3), ("ttft_p50_s", "TTFT P50 ms", 1e3),
        ("throughput_tok_s", "out tok/s", 1.0)]


def workload(rate, duration, seed, vocab, prompt=(64, 512), output=(16, 64)):
    rng = random.Random(seed)
    specs = synthetic(rate, duration, lambda: (rng.randint(*prompt), rng.randint(*output)), rng, "poisson")
    for s in specs:
        s.prompt_token_ids = [rng.randrange(2, vocab) for _ in range(s.prompt_len)]
    return specs


def run_real(model, name, specs, opts):
    """Serve the workload on the engine; also return each busy step's (tokens, context, seqs, time)."""
    from engine import LLM
    llm = LLM(model, scheduler=name, **opts)
    llm.generate([specs[0].prompt_token_ids[:8]] * 2, None)   # warm-up outside the clock
    sched = llm.engine.worker.scheduler
    orig, shapes = sched.schedule, []

    def spy():
        b = orig()
        shapes.append([(r.num_computed_tokens, n) for r, n in b.items])
        return b
    sched.schedule = spy
    llm.coordinator.steps.clear()
    run = serve(llm, specs, progress=False)
    steps = [{"tokens": sum(n for _, n in s), "seqs": len(s),
              "context": sum(attention_pairs(n, c) for c, n in s), "time_s": r.step_time_s}
             for s, r in zip(shapes, llm.coordinator.steps) if s]
    return llm, run.summary(), steps


def run_sim(cost, name, specs, llm, opts):
    cfg = SimConfig(instances=1, ranks=1, max_num_seqs=opts["max_num_seqs"],
                    max_num_batched_tokens=opts["max_num_batched_tokens"],
                    block_size=llm.config.kv_block_size,
                    kv_blocks=llm.engine.worker.scheduler.block_manager.num_blocks,
                    max_model_len=llm.engine.worker.scheduler.max_model_len, enable_prefix_caching=False)
    return Simulator(cfg, name, lambda n: make_cost_model(f"fitted:{cost}", n), specs).run().summary()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cost", required=True, help="JSON written by bench.fit_cost")
    p.add_argument("--schedulers", default="sbs,immediate-rr")
    p.add_argument("--rate", type=float, default=2.5)
    p.add_argument("--duration", type=float, default=16.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: steadier timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the numbers here (JSON)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from model.config import load_config
    specs = workload(a.rate, a.duration, a.seed, load_config(a.model).vocab_size)
    print(f"{len(specs)} requests over {specs[-1].arrival_s:.1f} s, "
          f"{sum(s.prompt_len for s in specs)} prompt + {sum(s.max_tokens for s in specs)} output tokens",
          file=sys.stderr)
    opts = {"enable_prefix_caching": False, "max_num_batched_tokens": a.max_num_batched_tokens,
            "max_num_seqs": a.max_num_seqs}
    coef = json.load(open(a.cost))["coefficients"]
    out = {}
    for name in a.schedulers.split(","):
        llm, real, steps = run_real(a.model, name, specs, opts)
        sim = run_sim(a.cost, name, specs, llm, opts)
        busy_real, busy_pred = sum(s["time_s"] for s in steps), float(predict(coef, steps).sum())
        out[name] = {"real": real, "sim": sim, "busy_real_s": busy_real, "busy_pred_s": busy_pred,
                     "steps_real": len(steps), "steps_sim": sim.get("steps"), "real_batches": steps}
        print(f"\n{name}: {real['completed']} done real, {sim['completed']} sim; steps real {len(steps)}, "
              f"sim {sim.get('steps')}; busy time real {busy_real:.1f} s, fitted model on the same batches "
              f"{busy_pred:.1f} s ({100 * (busy_pred / busy_real - 1):+.0f} %)")
        print(f"  {'':14s}{'real':>10s}{'sim':>10s}{'error':>9s}")
        for key, label, scale in KEYS:
            r, s = real[key], sim[key]
            out[name][key + "_error"] = s / r - 1
            print(f"  {label:14s}{r * scale:10.1f}{s * scale:10.1f}{100 * (s / r - 1):+8.0f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
