"""Cluster-scale simulation of the global schedulers on a DeepSeek-V3 deployment.

  python -m bench.simulate --dp 8 --instances 4 --mode pd \
      --schedulers immediate-rr,immediate-lb,sbs,adp-balance \
      --trace /work/shared/traces/azure_llm_2023_conv.csv --rate 250 --duration 60 \
      --cost-model h200-v3 --out bench/out/sim

Runs every scheduler on the same workload with the real scheduler/ code (scheduler/sim), prints a
side-by-side table, writes results.json ({"schedulers": {NAME: {ttft_mean_s, ...}}}) and PNG plots
(TTFT CDF, per-step imbalance over time; with --sweep-rates, TTFT against throughput).
"""
import argparse
import json
import math
import os
import random
import sys
import time

from scheduler.sim import SimConfig, length_sampler, load_requests, make_cost_model, synthetic, trace_workload
from scheduler.ordering import rank_order
from scheduler.sim.simulator import Simulator

COLUMNS = [("ttft_mean_s", "TTFT mean", 1e3), ("ttft_p50_s", "P50", 1e3), ("ttft_p99_s", "P99", 1e3),
           ("tpot_mean_s", "TPOT", 1e3), ("throughput_tok_s", "out tok/s", 1),
           ("prompt_tok_s", "in tok/s", 1), ("utilization", "util", 1), ("step_utilization", "step util", 1),
           ("imbalance_mean", "imbal", 1), ("imbalance_weighted", "imbal(w)", 1),
           ("idle_fraction", "idle", 1), ("prefix_hit", "prefix hit", 1), ("completed", "done", 1)]


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
    p.add_argument("--cv", type=float, default=3.0,
                   help="bursty: coefficient of variation of inter-arrival times")
    p.add_argument("--lengths", choices=["trace", "lognormal", "fixed"], default="lognormal",
                   help="synthetic arrivals: length distribution "
                        "(trace: (prompt, output) pairs drawn from --length-trace)")
    p.add_argument("--length-trace", default="/work/shared/traces/azure_llm_2023_conv.csv")
    p.add_argument("--prompt-len", type=float, default=1024)
    p.add_argument("--output-len", type=float, default=256,
                   help="lognormal: output mean (see --output-median)")
    p.add_argument("--prompt-sigma", type=float, default=1.0, help="lognormal: spread of log prompt length")
    p.add_argument("--output-sigma", type=float, default=1.0, help="lognormal: spread of log output length")
    p.add_argument("--output-median", type=float, default=None,
                   help="lognormal: output median instead of --output-len (mean = median * exp(sigma^2 / 2))")
    p.add_argument("--requests", help="JSONL: arrival_s, prompt_len or prompt_token_ids, max_tokens")
    p.add_argument("--trace", help="Azure LLM trace CSV, replayed compressed to --rate (or --speedup)")
    p.add_argument("--speedup", type=float, default=None, help="trace time compression factor")
    p.add_argument("--trace-start", type=float, default=0.0, help="trace seconds to skip")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale trace prompt/output lengths")
    p.add_argument("--max-prompt", type=int, default=16384)
    p.add_argument("--max-output", type=int, default=4096)
    p.add_argument("--cost-model", default="h800-v3",
                   help="h800-v3 | h100-v3 | h200-v3 | fitted:FILE | linear:c0,c_tok,..")
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
                   help="sweep: report the throughput at which mean TTFT reaches these values "
                        "(s, comma separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", action="store_true",
                   help="workload grid: SBS vs the best immediate baseline per cell, at 1 x 32 and 4 x 8 "
                        "(pd)")
    p.add_argument("--grid-prompts", default="256,1024,4096",
                   help="grid: prompt means (lognormal, sigma 0.6)")
    p.add_argument("--grid-outputs", default="16,512", help="grid: output means (lognormal, sigma 1)")
    p.add_argument("--grid-cvs", default="1,15", help="grid: inter-arrival CVs")
    p.add_argument("--grid-utils", default="0.3,0.8",
                   help="grid: prefill utilization (of the balanced full-step capacity)")
    p.add_argument("--grid-layouts", default="1x32:h800-v3,4x8:h200-v3", help="grid: INSTANCESxDP:COST,...")
    p.add_argument("--grid-render", nargs="*", default=None, metavar="GRID_JSON",
                   help="print the table of earlier --grid runs (their grid.json) again")
    p.add_argument("--grid-requests", type=int, default=500, help="grid: requests per cell (about)")
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
    out_mean = a.output_len if a.output_median is None else \
        a.output_median * math.exp(a.output_sigma ** 2 / 2)
    lengths = length_sampler(a.lengths, rng, a.prompt_len, out_mean, trace=a.length_trace,
                             max_prompt=a.max_prompt, max_output=a.max_output, prompt_sigma=a.prompt_sigma,
                             output_sigma=a.output_sigma)
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
            plain = f"{v:11.0f}" if abs(v) >= 100 else f"{v:11.3f}"
            cells.append(f"{v * scale:11.1f}" if scale != 1 else plain)
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
        ax.set_xlabel("time (s)"), ax.set_ylabel("imbalance (max/mean tokens)")
        ax.legend(), ax.grid(alpha=.3)
        fig.tight_layout(), fig.savefig(os.path.join(out, "imbalance.png"), dpi=120), plt.close(fig)
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, rows in sweep.items():
            for ax, key in zip(axes, ("ttft_mean_s", "ttft_p99_s")):
                ax.plot([r["throughput_tok_s"] for r in rows], [r[key] for r in rows], "o-", label=name)
                ax.set_xlabel("output throughput (tok/s)"), ax.set_ylabel(key)
                ax.set_yscale("log"), ax.grid(alpha=.3)
        axes[0].legend()
        fig.tight_layout(), fig.savefig(os.path.join(out, "sweep.png"), dpi=120), plt.close(fig)


def prefill_capacity(cost_spec: str, ranks: int, budget: int, prompt_mean: float) -> float:
    """Prompt tokens/s of one instance whose ranks all run full, balanced prefill steps of prompts
    of `prompt_mean` tokens: the yardstick for the grid's utilization."""
    from scheduler.sim.cost import RankWork
    cost = make_cost_model(cost_spec, ranks)
    seqs = max(1, round(budget / prompt_mean))
    w = RankWork(tokens=budget, seqs=seqs, sampled=seqs, prefill_tokens=budget,
                 prefill_pairs=budget * (min(prompt_mean, budget) + 1) / 2)
    t, _ = cost.step([w] * ranks)
    return ranks * budget / t


def why(cell, s, b) -> str:
    """A short reason for SBS's result against the best immediate baseline `b` in this cell."""
    gain = s["ttft_mean_s"] / b["ttft_mean_s"] - 1
    ib, isb = b["imbalance_weighted"], s["imbalance_weighted"]
    if gain <= -0.05:
        parts = [f"fewer bubbles (imbal(w) {ib:.2f}->{isb:.2f})"] if isb < 0.95 * ib else []
        if cell["prompt"] >= 1024:
            parts.append("long prompts chunked to the level: shorter steps")
        if cell["cv"] >= 5:
            parts.append("bursts queued centrally")
        return ", ".join(parts) or "central queue: work goes to the rank or instance free first"
    if gain < 0.05:
        if ib < 1.3:
            return f"little to balance (imbal(w) {ib:.2f})"
        if s["utilization"] >= 0.65:
            return f"near saturation (util {s['utilization']:.2f}): queueing dominates"
        return f"imbal(w) {ib:.2f}->{isb:.2f} without a TTFT gain"
    return f"worse: smaller steps pay the fixed cost more often (imbal(w) {ib:.2f}->{isb:.2f})"


def run_grid(a) -> list[dict]:
    """Every cell: P/D with a 32-rank decode pool, bursty arrivals, lognormal prompt (sigma 0.6,
    clipped at 8k) and output (sigma 1); rate from the target utilization of the prefill instances."""
    rows = []
    fl = [float(x) for x in a.grid_prompts.split(",")]
    for layout in a.grid_layouts.split(","):
        shape, _, cost_spec = layout.partition(":")
        inst, _, dp = shape.partition("x")
        inst, dp = int(inst), int(dp)
        for prompt in fl:
            cap = prefill_capacity(cost_spec, dp, a.max_num_batched_tokens, prompt) * inst
            for output in [float(x) for x in a.grid_outputs.split(",")]:
                for cv in [float(x) for x in a.grid_cvs.split(",")]:
                    for util in [float(x) for x in a.grid_utils.split(",")]:
                        rate = util * cap / prompt
                        g = argparse.Namespace(**vars(a))
                        g.instances, g.dp, g.cost_model, g.mode = inst, dp, cost_spec, "pd"
                        g.arrival, g.cv, g.lengths = "bursty", cv, "lognormal"
                        g.prompt_len, g.prompt_sigma, g.max_prompt = prompt, 0.6, 8192
                        # outputs clipped at 2x their mean: in P/D they only feed the decode pool, and
                        # the longest ones would set the simulated time (and the grid's wall time)
                        g.output_len, g.output_sigma, g.output_median = output, 1.0, None
                        g.max_output = int(2 * output)
                        g.duration = a.grid_requests / rate
                        specs = build_workload(g, rate)
                        res = {n: run_one(g, n, specs, {})[0]
                               for n in ("immediate-rr", "immediate-lb", "sbs")}
                        best = min(("immediate-rr", "immediate-lb"), key=lambda n: res[n]["ttft_mean_s"])
                        cell = {"layout": shape, "prompt": prompt, "output": output, "cv": cv, "util": util,
                                "rate": rate, "best": best, "results": res}
                        cell["reason"] = why(cell, res["sbs"], res[best])
                        rows.append(cell)
                        print(grid_row(cell), flush=True)
    return rows


GRID_HEAD = ("| layout | prompt | output | CV | util | req/s | best immediate | TTFT mean best / sbs (ms) | "
             "mean | P99 | tput | why |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def grid_row(c) -> str:
    s, b = c["results"]["sbs"], c["results"][c["best"]]

    def d(k):
        return f"{100 * (s[k] / b[k] - 1):+.0f} %"
    return (f"| {c['layout']} | {c['prompt']:.0f} | {c['output']:.0f} | {c['cv']:g} | {c['util']:g} | "
            f"{c['rate']:.0f} | {c['best'].replace('immediate-', '')} | "
            f"{b['ttft_mean_s'] * 1e3:.0f} / {s['ttft_mean_s'] * 1e3:.0f} | "
            f"{d('ttft_mean_s')} | {d('ttft_p99_s')} | {d('throughput_tok_s')} | {c['reason']} |")


def main(argv=None):
    a = parse_args(argv)
    if a.grid_render is not None:
        print(GRID_HEAD)
        for path in a.grid_render:
            with open(path) as f:
                for c in json.load(f)["cells"]:
                    c["reason"] = why(c, c["results"]["sbs"], c["results"][c["best"]])
                    print(grid_row(c))
        return None
    if a.grid:
        print(GRID_HEAD, flush=True)
        rows = run_grid(a)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "grid.json"), "w") as f:
                json.dump({"config": vars(a), "cells": rows}, f, indent=1)
        return rows
    names = [n for n in a.schedulers.split(",") if n]
    opts = parse_opts(a.opt)
    rates = [float(r) for r in a.sweep_rates.split(",")] if a.sweep_rates else [a.rate]
    results, recs, sweep = {}, {}, {}
    for rate in rates:
        specs = build_workload(a, rate)
        print(f"rate {rate}: {len(specs)} requests over {specs[-1].arrival_s:.1f} s"
              if specs else "no requests",
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
            print(f"  {name:14s} {r['throughput_tok_s'] or float('nan'):.0f} tok/s"
                  + (" (never reached)" if r["capped"] else ""))
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
