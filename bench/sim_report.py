"""Markdown tables from bench.simulate results: python -m bench.sim_report DIR [DIR ...]
(`--slo DIR [DIR ...]`: merge the rate sweeps of the runs and give the throughput at each SLO).

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
    lines = [f"### {os.path.basename(os.path.normpath(path))}: mode {cfg.get('mode')}, "
             f"{cfg.get('instances')} x {cfg.get('dp')} ranks, {cfg.get('cost_model')}, "
             f"chunk budget {cfg.get('max_num_batched_tokens')}", ""]
    head = "| rate (req/s) | " + " | ".join(f"{n} TTFT mean / P99 (ms)" for n in names)
    lines += [head + " | sbs vs rr: mean / P99 | util rr / sbs |", "|" + "---|" * (len(names) + 3)]
    rows = {n: {r["rate"]: r for r in sweep[n]} for n in names}
    for rate in sorted(rows[names[0]]):
        cells = [f"{rows[n][rate]['ttft_mean_s'] * 1e3:.0f} / {rows[n][rate]['ttft_p99_s'] * 1e3:.0f}"
                 for n in names]
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
        rr = res.get("immediate-rr", {}).get("throughput_tok_s")
        sbs = res.get("sbs", {}).get("throughput_tok_s")
        if rr and sbs:
            line += f" (sbs vs rr {pct(sbs, rr)})"
        lines.append(line)
    return "\n".join(lines) + "\n"


def slo_report(paths: list[str], slos=(0.5, 1.0)) -> str:
    """Merge the rate sweeps of several runs (e.g. rr and sbs swept over different rates around
    their own SLO crossings) and give each scheduler's output tok/s at each mean-TTFT SLO."""
    from bench.simulate import at_slo
    sweep: dict[str, list] = {}
    for path in paths:
        with open(os.path.join(path, "results.json")) as f:
            doc = json.load(f)
        for name, rows in (doc.get("sweep") or {n: [r] for n, r in doc["schedulers"].items()}).items():
            sweep.setdefault(name, []).extend(rows)
    lines = []
    for slo in slos:
        res = at_slo(sweep, slo)
        parts = []
        for n, r in res.items():
            t = r["throughput_tok_s"]
            parts.append(f"{n} " + ("above the SLO at the lowest rate" if t is None else f"{t:.0f} tok/s")
                         + (" (never reached: last rate)" if r["capped"] else ""))
        rr = res.get("immediate-rr", {}).get("throughput_tok_s")
        sbs = res.get("sbs", {}).get("throughput_tok_s")
        extra = f" (sbs vs rr {pct(sbs, rr)})" if rr and sbs else ""
        lines.append(f"mean TTFT {slo:g} s: " + ", ".join(parts) + extra)
        for n in sweep:
            pts = sorted((r["rate"], r["ttft_mean_s"], r["throughput_tok_s"]) for r in sweep[n])
            lines.append(f"  {n}: " + ", ".join(f"{a:g} req/s {b * 1e3:.0f} ms {c:.0f} tok/s"
                                                for a, b, c in pts))
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--slo"]:
        print(slo_report(sys.argv[2:]))
    else:
        for p in sys.argv[1:]:
            print(report(p))
