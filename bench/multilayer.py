"""Request order x DP dispatch in the simulator, on one seeded multi-turn workload.

  python -m bench.multilayer --dp 8 --rate 12 --duration 60 --cost-model h200-v3

Workload: `--sessions` clients, each conversation opening with one of `--prefixes` shared system
prompts (`--prefix-len` tokens); every turn's prompt is system + the conversation so far + a new
user message (lognormal length), so a session's next prompt starts with its previous one (the
simulator samples token 1, so the history carries `max_tokens` ones as the answer and the cached
blocks match). A conversation longer than --max-prompt starts over. Prefix caching is on.

Runs, on the same workload, dispatch immediate-rr (vLLM's default) / immediate-lb / immediate-gimbal /
sbs with fcfs or sjf-with-aging order (see run()), and prints TTFT mean/P50/P99, TPOT, throughput and
prefix-cache hits, with changes against the first run.

The rank-local SJF variants go through SimConfig.rank_order (the cache-aware key needs each rank's
block manager).
"""
import argparse
import json
import random
import sys
import time

from scheduler.ordering import make_order, rank_order
from scheduler.sim import SimConfig, Simulator, length_sampler, make_cost_model, multi_turn, synthetic

RUNS = ("immediate-rr:fcfs,immediate-rr:sjf,immediate-lb:fcfs,immediate-gimbal:fcfs,"
        "immediate-gimbal:sjf-blind,immediate-gimbal:sjf,sbs:fcfs,sbs:sjf,sbs:sjf-global")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=8, help="DP ranks (one instance)")
    p.add_argument("--rate", type=float, default=12.0, help="req/s, Poisson")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--prefixes", type=int, default=4, help="shared system prompts")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=float, default=1024, help="mean new user tokens per turn")
    p.add_argument("--output-len", type=float, default=256)
    p.add_argument("--max-prompt", type=int, default=16384)
    p.add_argument("--cost-model", default="h200-v3")
    p.add_argument("--runs", default=RUNS,
                   help="DISPATCH[@TAG]:ORDER,... (order: fcfs | sjf | sjf-blind | sjf-global)")
    p.add_argument("--opt", action="append", default=[], metavar="DISPATCH[@TAG]:KEY=VALUE",
                   help="scheduler option for the runs with that label, "
                        "e.g. immediate-gimbal@gap:sticky_gap_tokens=16000")
    p.add_argument("--sjf-aging", type=float, default=1000.0, help="token-equivalents per second waited")
    p.add_argument("--sjf-decode-weight", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summaries here")
    return p.parse_args(argv)


def workload(a):
    rng = random.Random(a.seed)
    lengths = length_sampler("lognormal", rng, a.prompt_len, a.output_len, max_prompt=a.max_prompt // 2,
                             max_output=4096)
    specs = synthetic(a.rate, a.duration, lengths, rng, "poisson")
    fresh = iter(range(1000, 1 << 62))   # token ids never shared by accident (1 is the sampled token)
    return multi_turn(specs, rng, lambda: next(fresh), sessions=a.sessions, prefixes=a.prefixes,
                      prefix_len=a.prefix_len, max_prompt=a.max_prompt)


def run(a, specs, dispatch, order_name, opts=None):
    """order_name: fcfs | sjf (rank queues, cache-aware: prompt tokens already cached on that rank do
    not count) | sjf-blind (rank queues, whole prompt counts) | sjf-global (sbs: its buffer too, which
    cannot see the ranks' caches, plus cache-aware rank queues)."""
    if order_name not in ("fcfs", "sjf", "sjf-blind", "sjf-global"):
        raise SystemExit(f"unknown order {order_name!r}")
    cfg = SimConfig(ranks=a.dp, enable_prefix_caching=True, scheduler_options=dict(opts or {}))
    if dispatch == "sbs":
        cfg.scheduler_options.setdefault("prefix_aware", True)
        cfg.scheduler_options["order"] = (
            make_order("sjf", aging_rate=a.sjf_aging, decode_weight=a.sjf_decode_weight).as_key()
            if order_name == "sjf-global" else "fcfs")
    if order_name != "fcfs":   # rank queues in SJF order; cache-aware unless blind
        blind = {"cached": None} if order_name == "sjf-blind" else {}
        cfg.rank_order = lambda bm: rank_order("sjf", bm, aging_rate=a.sjf_aging,
                                               decode_weight=a.sjf_decode_weight, **blind)
    sim = Simulator(cfg, dispatch, lambda n: make_cost_model(a.cost_model, n), specs)
    hits = [0, 0]
    done = sim.rec.done

    def record(req):   # prefix-cache hits, read before the recorder drops the token ids
        hits[0] += req.num_cached_tokens
        hits[1] += req.num_prompt_tokens
        done(req)
    sim.rec.done = record
    t0 = time.time()
    out = sim.run().summary()
    out["prefix_hit"] = hits[0] / max(1, hits[1])
    out["wall_s"] = time.time() - t0
    return out


COLS = [("ttft_mean_s", "TTFT mean ms", 1e3), ("ttft_p50_s", "P50 ms", 1e3), ("ttft_p99_s", "P99 ms", 1e3),
        ("tpot_mean_s", "TPOT ms", 1e3), ("throughput_tok_s", "out tok/s", 1), ("prefix_hit", "hit %", 100),
        ("completed", "done", 1)]


def table(results, base):
    head = (f"{'dispatch:order':28s}" + "".join(f"{h:>13s}" for _, h, _ in COLS)
            + f"{'dTTFT':>9s}{'dP99':>9s}{'dTPOT':>9s}")
    lines = [head, "-" * len(head)]
    b = results.get(base)
    for name, r in results.items():
        row = f"{name:28s}" + "".join(f"{r[k] * s:13.1f}" for k, _, s in COLS)
        if b:
            row += "".join(f"{100 * (r[k] / b[k] - 1):+8.1f}%"
                           for k in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s"))
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    specs = workload(a)
    toks = sum(s.prompt_len for s in specs)
    print(f"{len(specs)} requests over {specs[-1].arrival_s:.1f} s, {a.sessions} sessions, mean prompt "
          f"{toks / len(specs):.0f} tokens, mean output {sum(s.max_tokens for s in specs) / len(specs):.0f}",
          file=sys.stderr)
    results = {}
    opts = {}
    for o in a.opt:
        label, _, kv = o.partition(":")
        key, _, val = kv.partition("=")
        opts.setdefault(label, {})[key] = json.loads(val)
    for item in a.runs.split(","):
        label, _, order_name = item.partition(":")
        results[item] = run(a, specs, label.partition("@")[0], order_name or "fcfs", opts.get(label))
        print(f"  {item}: {results[item]['wall_s']:.1f} s wall", file=sys.stderr)
    print(table(results, a.runs.split(",")[0]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
