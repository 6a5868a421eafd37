"""Cluster-scale simulation of the global schedulers on a DeepSeek-V3 deployment.

  python -m bench.simulate --dp 8 --instances 4 --mode pd --schedulers immediate-rr,immediate-lb,sbs,adp-balance \
      --trace /work/shared/traces/azure_llm_2023_conv.csv --rate 250 --duration 60 --cost-model h200-v3 --out bench/out/sim

Runs every scheduler on the same workload with the real scheduler/ code (scheduler/sim), prints a
side-by-side table, writes results.json ({"schedulers": {NAME: {ttft_mean_s, ...}}}) and PNG plots
(TTFT CDF, per-step imbalance over time; with --sweep-rates, TTFT against throughput).
"""
import argparse
import json
import os
import random
import sys
import time

from scheduler.sim import SimConfig, length_sampler, load_requests, make_cost_model, synthetic, trace_workload
from scheduler.ordering import rank_order
from scheduler.sim.simulator import Simulator

COLUMNS = [("ttft_mean_s", "TTFT mean", 1e3), ("ttft_p50_s", "P50", 1e3), ("ttft_p99_s", "P99", 1e3),
           ("tpot_mean_s", "TPOT", 1e3), ("throughput_tok_s", "out tok/s", 1), ("prompt_tok_s", "in tok/s", 1),
           ("utilization", "util", 1), ("step_utilization", "step util", 1), ("imbalance_mean", "imbal", 1), ("imbalance_weighted", "imbal(w)", 1), ("idle_fraction", "idle", 1),
           ("prefix_hit", "prefix hit", 1), ("completed", "done", 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=32, help="DP ranks per instance")
    p.add_argument("--rank-order", default="fcfs", choices=["fcfs", "sjf", "priority"],
                   help="order of each rank's local queue (scheduler/ordering.py, with aging)")
    p.add_argument("--instances", type=int, default=1, help="lockstep instances (pd: prefill instances)")
    p.add_argument("--mode", choices=["colocated", "pd"], default="colocated")
    p.add_argument("--decode-instances", type=int, default=1, help="pd: decode instances")
    p.add_argument("--decode-dp", type=int, default=32, help="pd: DP ranks per decode instance")
    p.add_argument("--schedulers", default="immediate-rr,immediate-lb,sbs,adp-balance")
    p.add_argument("--rate", type=float, default=None, help="mean arrival rate, req/s")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals (synthetic default 60; --trace default: the whole trace)")
    p.add_argument("--arrival", choices=["poisson", "bursty"], default="bursty")
    p.add_argument("--cv", type=float, default=3.0, help="bursty: coefficient of variation of inter-arrival times")
    p.add_argument("--lengths", choices=["trace", "lognormal", "fixed"], default="lognormal",
                   help="synthetic arrivals: length distribution (trace: (prompt, output) pairs drawn from --length-trace)")
    p.add_argument("--length-trace", default="/work/shared/traces/azure_llm_2023_conv.csv")
    p.add_argument("--prompt-len", type=float, default=1024)
    p.add_argument("--output-len", type=float, default=256)
    p.add_argument("--requests", help="JSONL: arrival_s, prompt_len or prompt_token_ids, max_tokens")
    p.add_argument("--trace", help="Azure LLM trace CSV, replayed compressed to --rate (or --speedup)")
    p.add_argument("--speedup", type=float, default=None, help="trace time compression factor")
    p.add_argument("--trace-start", type=float, default=0.0, help="trace seconds to skip")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale trace prompt/output lengths")
    p.add_argument("--max-prompt", type=int, default=16384)
    p.add_argument("--max-output", type=int, default=4096)
    p.add_argument("--cost-model", default="h800-v3", help="h800-v3 | h100-v3 | h200-v3 | fitted:FILE | linear:c0,c_tok,..")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="per rank per step")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=None, help="per rank (default: from the cost model)")
    p.add_argument("--prefix-caching", action="store_true")
    p.add_argument("--horizon", type=float, default=None, help="stop the clock here (default: drain)")
    p.add_argument("--opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="scheduler option, e.g. sbs:max_wait_s=1.0 (repeatable)")
    p.add_argument("--sweep-rates", default=None, help="R1,R2,...: run every scheduler at each rate")
    p.add_argument("--slo-ttft", default="0.5,1.0",
                   help="sweep: report the throughput at which mean TTFT reaches these values (s, comma separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for results.json and plots")
    return p.parse_args(argv)


def build_workload(a, rate):
    rng = random.Random(a.seed)
    if a.requests:
        return load_requests(a.requests)
    if a.trace and rate is None and a.speedup is None:
        raise SystemExit("--trace needs --rate or --speedup")
    if a.trace:
        return trace_workload(a.trace, rate=rate if a.speedup is None else None, speedup=a.speedup,
                              start_s=a.trace_start, duration=a.duration, max_prompt=a.max_prompt,
                              max_output=a.max_output, length_scale=a.length_scale)
    if rate is None:
        raise SystemExit("--rate is required without --requests or --trace")
    if a.duration is None:
        a.duration = 60.0
    lengths = length_sampler(a.lengths, rng, a.prompt_len, a.output_len, trace=a.length_trace,
                             max_prompt=a.max_prompt, max_output=a.max_output)
    return synthetic(rate, a.duration, lengths, rng, a.arrival, a.cv)


def parse_opts(opts):
    out = {}
    for o in opts:
        name, _, kv = o.partition(":")
        key, _, val = kv.partition("=")
        if not key or not _:
            raise SystemExit(f"--opt {o!r}: expected NAME:KEY=VALUE")
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        out.setdefault(name, {})[key] = val
    return out


def run_one(a, name, specs, opts):
    cfg = SimConfig(mode=a.mode, instances=a.instances, ranks=a.dp, decode_instances=a.decode_instances,
                    decode_ranks=a.decode_dp, max_num_seqs=a.max_num_seqs, decode_max_num_seqs=a.max_num_seqs,
                    max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                    kv_blocks=a.kv_blocks, enable_prefix_caching=a.prefix_caching, horizon=a.horizon,
                    scheduler_options=dict(opts.get(name, {})),
                    rank_order=lambda bm: rank_order(a.rank_order, bm))
    if name == "sbs" and "prefix_aware" not in cfg.scheduler_options:
        cfg.scheduler_options["prefix_aware"] = a.prefix_caching
    sim = Simulator(cfg, name, lambda n: make_cost_model(a.cost_model, n), specs)
    rec = sim.run()
    return rec.summary(), rec


def table(results: dict) -> str:
    """Side-by-side table of the columns some run reports, then SBS's changes against each other run."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    head = f"{'scheduler':14s}" + "".join(f"{h:>11s}" for _, h, _ in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = []
        for key, _, scale in cols:
            v = r.get(key, float("nan"))
            cells.append(f"{v * scale:11.1f}" if scale != 1 else (f"{v:11.0f}" if abs(v) >= 100 else f"{v:11.3f}"))
        lines.append(f"{name:14s}" + "".join(cells))
    s = results.get("sbs")
    for name, base in results.items():
        if s is None or name == "sbs":
            continue
        lines.append(f"sbs vs {name}: TTFT mean {100 * (s['ttft_mean_s'] / base['ttft_mean_s'] - 1):+.1f} %, "
                     f"P99 {100 * (s['ttft_p99_s'] / base['ttft_p99_s'] - 1):+.1f} %, "
                     f"throughput {100 * (s['throughput_tok_s'] / base['throughput_tok_s'] - 1):+.1f} %")
    return "\n".join(lines)


def at_slo(sweep: dict, slo: float) -> dict:
    """Per scheduler: the output throughput at which mean TTFT reaches `slo`, linearly interpolated
    between the swept rates (None if already above it at the lowest rate; the last rate's figure,
    marked "capped", if never reached)."""
    out = {}
    for name, rows in sweep.items():
        rows = sorted(rows, key=lambda r: r["rate"])
        thr, capped = None, False
        for lo, hi in zip([None] + rows[:-1], rows):
            if hi["ttft_mean_s"] > slo:
                if lo is not None:
                    f = (slo - lo["ttft_mean_s"]) / (hi["ttft_mean_s"] - lo["ttft_mean_s"])
                    thr = lo["throughput_tok_s"] + f * (hi["throughput_tok_s"] - lo["throughput_tok_s"])
                break
        else:
            thr, capped = rows[-1]["throughput_tok_s"], True
        out[name] = {"slo_ttft_s": slo, "throughput_tok_s": thr, "capped": capped}
    return out


def plot(out, recs, sweep):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plots", file=sys.stderr)
        return
    if recs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rec in recs.items():
            xs = sorted(rec.ttfts())
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xlabel("TTFT (s)"), ax.set_ylabel("CDF"), ax.set_xscale("log"), ax.legend(), ax.grid(alpha=.3)
        fig.tight_layout(), fig.savefig(os.path.join(out, "ttft_cdf.png"), dpi=120), plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rec in recs.items():
            s = rec.series
            k = max(1, len(s) // 400)   # mean over windows of k steps
            pts = [(s[i][0], sum(x[1] for x in s[i:i + k]) / len(s[i:i + k])) for i in range(0, len(s), k)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1)
        ax.set_xlabel("time (s)"), ax.set_ylabel("imbalance (max/mean tokens)"), ax.legend(), ax.grid(alpha=.3)
        fig.tight_layout(), fig.savefig(os.path.join(out, "imbalance.png"), dpi=120), plt.close(fig)
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, rows in sweep.items():
            for ax, key in zip(axes, ("ttft_mean_s", "ttft_p99_s")):
                ax.plot([r["throughput_tok_s"] for r in rows], [r[key] for r in rows], "o-", label=name)
                ax.set_xlabel("output throughput (tok/s)"), ax.set_ylabel(key), ax.set_yscale("log"), ax.grid(alpha=.3)
        axes[0].legend()
        fig.tight_layout(), fig.savefig(os.path.join(out, "sweep.png"), dpi=120), plt.close(fig)


def main(argv=None):
    a = parse_args(argv)
    names = [n for n in a.schedulers.split(",") if n]
    opts = parse_opts(a.opt)
    rates = [float(r) for r in a.sweep_rates.split(",")] if a.sweep_rates else [a.rate]
    results, recs, sweep = {}, {}, {}
    for rate in rates:
        specs = build_workload(a, rate)
        print(f"rate {rate}: {len(specs)} requests over {specs[-1].arrival_s:.1f} s" if specs else "no requests",
              file=sys.stderr)
        for name in names:
            t0 = time.time()
            summary, rec = run_one(a, name, specs, opts)
            summary["rate"] = rate
            print(f"  {name}: {time.time() - t0:.1f} s wall", file=sys.stderr)
            sweep.setdefault(name, []).append(summary)
            results[name], recs[name] = summary, rec
        if len(rates) > 1:
            print(f"\n== rate {rate} req/s ==")
        print(table(results))
    for slo in (a.slo_ttft.split(",") if len(rates) > 1 else []):
        print(f"\noutput throughput at which mean TTFT reaches {slo} s:")
        for name, r in at_slo(sweep, float(slo)).items():
            print(f"  {name:14s} {r['throughput_tok_s'] or float('nan'):.0f} tok/s" + (" (never reached)" if r["capped"] else ""))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        doc = {"config": vars(a), "schedulers": results}
        if len(rates) > 1:
            doc["sweep"] = sweep
            doc["at_slo"] = {slo: at_slo(sweep, float(slo)) for slo in a.slo_ttft.split(",")}
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(doc, f, indent=1)
        plot(a.out, recs if len(rates) == 1 else {}, sweep if len(rates) > 1 else {})
        print(f"wrote {a.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
