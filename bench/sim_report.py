"""Markdown tables from bench.simulate results: python -m bench.sim_report DIR [DIR ...]

For each run directory (results.json with a rate sweep, or a single run) prints TTFT mean/P99 per
scheduler and rate, SBS's change against immediate-rr, and the throughput at each TTFT SLO.
"""
import json
import os
import sys


def pct(a, b):
    return f"{100 * (a / b - 1):+.0f} %" if a == a and b == b and b else "n/a"


def report(path: str) -> str:
    with open(os.path.join(path, "results.json")) as f:
        doc = json.load(f)
    cfg = doc.get("config", {})
    sweep = doc.get("sweep") or {n: [r] for n, r in doc["schedulers"].items()}
    names = list(sweep)
    lines = [f"### {os.path.basename(os.path.normpath(path))}: mode {cfg.get('mode')}, {cfg.get('instances')} x "
             f"{cfg.get('dp')} ranks, {cfg.get('cost_model')}, chunk budget {cfg.get('max_num_batched_tokens')}", ""]
    head = "| rate (req/s) | " + " | ".join(f"{n} TTFT mean / P99 (ms)" for n in names)
    lines += [head + " | sbs vs rr: mean / P99 | util rr / sbs |", "|" + "---|" * (len(names) + 3)]
    rows = {n: {r["rate"]: r for r in sweep[n]} for n in names}
    for rate in sorted(rows[names[0]]):
        cells = [f"{rows[n][rate]['ttft_mean_s'] * 1e3:.0f} / {rows[n][rate]['ttft_p99_s'] * 1e3:.0f}" for n in names]
        extra = ""
        if "sbs" in rows and "immediate-rr" in rows:
            s, r = rows["sbs"][rate], rows["immediate-rr"][rate]
            extra = (f" {pct(s['ttft_mean_s'], r['ttft_mean_s'])} / {pct(s['ttft_p99_s'], r['ttft_p99_s'])} |"
                     f" {r['utilization']:.2f} / {s['utilization']:.2f} |")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |" + extra)
    for slo, res in (doc.get("at_slo") or {}).items():
        parts = []
        for n in names:
            t = res[n]["throughput_tok_s"]
            parts.append(f"{n} {'-' if t is None else f'{t:.0f}'}{'+' if res[n]['capped'] else ''}")
        line = f"\nOutput tok/s at which mean TTFT reaches {slo} s: " + ", ".join(parts)
        rr, sbs = res.get("immediate-rr", {}).get("throughput_tok_s"), res.get("sbs", {}).get("throughput_tok_s")
        if rr and sbs:
            line += f" (sbs vs rr {pct(sbs, rr)})"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(report(p))
