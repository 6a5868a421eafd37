"""Instances as separate jobs behind one global scheduler service, on the conversation trace:
SBS vs the immediate baselines, and the TTFT disturbance when one instance is SIGKILLed mid-replay,
each beside the simulator's prediction (same requests, same limits, a fitted cost model).

    python -m bench.instances --model .cache/small-v3 --cost bench/fitted_cpu_small_v3.json \
        --instances 3 --rate 4 --duration 15 --repeats 3

Every run starts `launch.scheduler` and N `launch.instance` processes (one rank each, one torch thread),
replays the trace in real time through a SchedulerClient and reads each request's TTFT from its
metrics (arrival at the scheduler -> first token). With --kill, instance 1 is SIGKILLed at half the
replay; the simulator models the same failure (detected at once: a killed process closes its socket).
"""
import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

from engine.instances import SchedulerClient
from engine.sampling import SamplingParams
from scheduler.sim import SimConfig, Simulator, make_cost_model, trace_workload
from scheduler.sim.metrics import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(ROOT, "..", "shared", "traces", "azure_llm_2023_conv.csv")


def workload(a, vocab):
    specs = trace_workload(a.trace, rate=a.rate, duration=a.duration, start_s=a.start_s,
                           max_prompt=a.max_prompt, max_output=a.max_output, length_scale=a.length_scale)
    rng = random.Random(a.seed)
    for s in specs:
        s.prompt_token_ids = [rng.randrange(2, vocab) for _ in range(s.prompt_len)]
    return specs


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_line(p, prefix, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} within {timeout} s")


def run_real(a, name, specs, kill_at):
    secret = os.urandom(24).hex()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT, STAGGER_SECRET=secret)
    procs = []
    try:
        sched = _spawn(["launch.scheduler", "--listen", "127.0.0.1:0", "--model", a.model,
                        "--scheduler", name, "--kv-block-size", str(a.block_size), "--dead-after", "5"], env)
        procs.append(sched)
        host, port = _wait_line(sched, "stagger scheduler listening on").rsplit(" ", 1)[1].rsplit(":", 1)
        opts = ["-o", f"kv_block_size={a.block_size}", "-o", f"num_kv_blocks={a.kv_blocks}",
                "-o", f"max_num_seqs={a.max_num_seqs}",
                "-o", f"max_num_batched_tokens={a.max_num_batched_tokens}",
                "-o", "enable_prefix_caching=false"]
        inst = []
        for _ in range(a.instances):
            p = _spawn(["launch.instance", "--scheduler", f"{host}:{port}", "--model", a.model] + opts, env)
            procs.append(p)
            _wait_line(p, "stagger instance")
            inst.append(p)
        client = SchedulerClient((host, int(port)), secret.encode())
        # warm-up outside the clock: one short request per instance
        for i in range(a.instances):
            client.submit(specs[0].prompt_token_ids[:8], SamplingParams(temperature=0, max_tokens=2),
                          request_id=f"warm{i}")
        for _ in range(a.instances):
            client.next_output(timeout=120)
        done, t0 = {}, time.time()

        def send():
            for i, s in enumerate(specs):
                time.sleep(max(0.0, t0 + s.arrival_s - time.time()))
                client.submit(s.prompt_token_ids, SamplingParams(temperature=0, max_tokens=s.max_tokens,
                                                                 ignore_eos=True), request_id=f"r{i}")
        threading.Thread(target=send, daemon=True).start()
        killed = kill_at is None
        while len(done) < len(specs):
            if not killed:
                left = t0 + kill_at - time.time()
                if left <= 0:
                    inst[1].send_signal(signal.SIGKILL)
                    killed = True
                    continue
                if not client.ch.poll(left):
                    continue
            out = client.next_output(timeout=300)
            done[out.request_id] = out
        client.close()
        return [done[f"r{i}"] for i in range(len(specs))], t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_sim(a, name, specs, kill_at):
    cfg = SimConfig(instances=a.instances, ranks=1, max_num_seqs=a.max_num_seqs,
                    max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                    kv_blocks=a.kv_blocks,
                    failures=[(kill_at, 1)] if kill_at is not None else [])
    rec = Simulator(cfg, name, lambda n: make_cost_model(f"fitted:{a.cost}", n), specs).run()
    return {r[7]: r for r in rec.requests}


def summarize(ttfts_by_idx, specs, window):
    all_t = [t for t in ttfts_by_idx.values() if t is not None]
    lo, hi = window
    win = [t for i, t in ttfts_by_idx.items() if t is not None and lo <= specs[i].arrival_s < hi]
    return {"mean": statistics.fmean(all_t), "p50": percentile(all_t, 50), "p99": percentile(all_t, 99),
            "win_mean": statistics.fmean(win) if win else float("nan"), "win_n": len(win),
            "n": len(all_t)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cost", required=True, help="fitted cost model JSON (bench.fit_cost)")
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--schedulers", default="sbs,immediate-rr,immediate-lb")
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second after compression")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--start-s", type=float, default=600.0,
                    help="trace second to start from (the first minutes are sparse)")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--max-prompt", type=int, default=384)
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kill", default="no,yes", help="no, yes or both (no,yes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-only", action="store_true", help="only the simulator's prediction (no jobs)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    from model.config import load_config
    specs = workload(a, load_config(a.model).vocab_size)
    kill_at = a.duration / 2
    window = (kill_at, kill_at + 5.0)
    print(f"{len(specs)} requests over {specs[-1].arrival_s:.1f} s; "
          f"prompts {sum(s.prompt_len for s in specs)} "
          f"tokens, outputs {sum(s.max_tokens for s in specs)}; kill at {kill_at:.1f} s, window {window}",
          flush=True)
    results = {}
    for kill in a.kill.split(","):
        k = kill_at if kill == "yes" else None
        for name in a.schedulers.split(","):
            sim = run_sim(a, name, specs, k)
            sim_s = summarize({int(rid[1:]): r[2] - r[0] for rid, r in sim.items()}, specs, window)
            reals = []
            for rep in range(0 if a.sim_only else a.repeats):
                outs, _ = run_real(a, name, specs, k)
                errors = sum(1 for o in outs if o.finish_reason != "length")
                s = summarize({i: o.metrics.ttft for i, o in enumerate(outs)
                               if o.finish_reason == "length"}, specs, window)
                s["errors"] = errors
                reals.append(s)
                print(f"kill={kill} {name} run {rep}: " + json.dumps({x: round(v, 4) for x, v in s.items()}),
                      flush=True)
            results[f"{name}/kill={kill}"] = {"sim": sim_s, "real": reals}
    print("\n| scheduler | kill | TTFT mean real (median [range]) | sim | P99 real | sim | "
          "window mean real | sim |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, kill = key.split("/kill=")
        cell = []
        for m in ("mean", "p99", "win_mean"):
            vals = sorted(x[m] * 1e3 for x in r["real"])
            cell.append(f"{statistics.median(vals):.0f} [{vals[0]:.0f}-{vals[-1]:.0f}] ms" if vals else "-")
            cell.append(f"{r['sim'][m] * 1e3:.0f} ms")
        print(f"| {name} | {kill} | " + " | ".join(cell) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
