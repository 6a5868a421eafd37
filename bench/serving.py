"""Online serving benchmark of the real engine: the global schedulers side by side on one workload.

    torchrun --nproc-per-node 2 -m bench.serving --model DIR --scheduler immediate-rr,immediate-lb,sbs \
        [--requests FILE.jsonl | --trace CSV --rate R | --arrival bursty --rate R --duration S] --out DIR

Every scheduler replays the same arrivals in real time (rank 0's clock decides what has arrived and
broadcasts it, so all ranks add the same requests at the same step). Prints the side-by-side table
(TTFT mean/P50/P99, TPOT, throughput, imbalance, idle fraction) and writes results.json plus PNG
plots (TTFT CDF per scheduler, per-step imbalance over time). Runs on one process too.
"""
import argparse
import json
import os
import random
import sys
import time

from bench.simulate import plot, table
from scheduler.sim.metrics import percentile
from scheduler.sim.workload import length_sampler, load_requests, multi_turn, synthetic, trace_workload


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scheduler", default=None,
                   help="comma-separated names; NAME@TAG runs NAME again under its own label "
                        "(see --sched-opt); default immediate-rr,immediate-lb,sbs, none with --url")
    p.add_argument("--requests", help="JSONL: arrival_s, prompt_len or prompt_token_ids, max_tokens")
    p.add_argument("--trace", help="Azure LLM trace CSV, replayed compressed to --rate")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, req/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals (synthetic, trace)")
    p.add_argument("--arrival", choices=["poisson", "bursty"], default="bursty")
    p.add_argument("--cv", type=float, default=3.0, help="bursty: coefficient of variation of gaps")
    p.add_argument("--prompt-len", type=float, default=128)
    p.add_argument("--output-len", type=float, default=32)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--sessions", type=int, default=0,
                   help="multi-turn chat: this many clients, each prompt = its conversation so far + a new "
                        "message of --prompt-len tokens (mean); 0: independent prompts")
    p.add_argument("--prefixes", type=int, default=4, help="multi-turn: shared system prompts")
    p.add_argument("--prefix-len", type=int, default=256, help="multi-turn: system prompt tokens")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option (repeatable)")
    p.add_argument("--sched-opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="scheduler option for the run with that label, e.g. sbs:max_wait_s=0.5 or "
                        "sbs@blind:prefix_aware=false (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", action="append", default=[], metavar="[LABEL=]URL",
                   help="also replay the workload through an OpenAI-compatible server, streaming, with "
                        "client-side TTFT/TPOT/e2e (bench/http_client.py; repeatable; --model still builds "
                        "the workload's token ids)")
    p.add_argument("--api-key", default=None, help="for --url servers")
    p.add_argument("--peer", choices=["vllm"], help="also replay the workload through vLLM's CPU build")
    p.add_argument("--peer-python", help="vLLM's interpreter (default: $STAGGER_VLLM_PYTHON)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of this engine (torch) and of the --peer alike (default: each its own)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_workload(a, vocab: int):
    rng = random.Random(a.seed)
    if a.requests:
        specs = load_requests(a.requests)
    elif a.trace:
        specs = trace_workload(a.trace, rate=a.rate, duration=a.duration, max_prompt=a.max_prompt,
                               max_output=a.max_output)
    else:
        lengths = length_sampler("lognormal", rng, a.prompt_len, a.output_len, 0.8,
                                 max_prompt=a.max_prompt, max_output=a.max_output)
        specs = synthetic(a.rate, a.duration, lengths, rng, a.arrival, a.cv)
        if a.sessions:
            multi_turn(specs, rng, lambda: rng.randrange(2, vocab), sessions=a.sessions, prefixes=a.prefixes,
                       prefix_len=a.prefix_len, max_prompt=a.max_prompt)
    for s in specs:   # token ids are drawn once, so every scheduler sees the very same prompts
        if s.prompt_token_ids is None:
            s.prompt_token_ids = [rng.randrange(2, vocab) for _ in range(s.prompt_len)]
    return specs


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


class Run:
    """One scheduler's outcome, shaped like the simulator's recorder for the shared table/plots."""

    def __init__(self, outputs, steps, t0):
        self.outputs, self.t0 = outputs, t0
        busy = [s for s in steps if sum(s.tokens_per_rank)]
        self.busy = busy
        self.series = [(s.time - t0, s.imbalance, s.step_time_s) for s in busy]

    def ttfts(self):
        return [o.metrics.ttft for o in self.outputs if o.metrics and o.metrics.ttft is not None]

    def summary(self) -> dict:
        done = [o for o in self.outputs if o.finish_reason in ("stop", "length")]
        ttft = self.ttfts()
        tpot = [o.metrics.tpot for o in done if o.metrics.tpot is not None]
        held = [o.metrics.queue_time for o in done if o.metrics.queue_time is not None]
        first = min(o.metrics.arrival_time for o in self.outputs)
        last = max(o.metrics.finish_time for o in done)
        tokens = sum(len(o.token_ids) for o in done)
        prompt = sum(len(o.prompt_token_ids) for o in done)

        def mean(xs):
            return sum(xs) / len(xs) if xs else float("nan")

        return {"ttft_mean_s": mean(ttft), "ttft_p50_s": percentile(ttft, 50),
                "ttft_p99_s": percentile(ttft, 99),
                "tpot_mean_s": mean(tpot), "e2e_mean_s": mean([o.metrics.e2e for o in done]),
                "held_mean_s": mean(held), "throughput_tok_s": tokens / (last - first),
                "prompt_tok_s": prompt / (last - first),
                "prefix_hit": sum(o.num_cached_tokens for o in done) / max(1, prompt),
                "imbalance_mean": mean([s.imbalance for s in self.busy]),
                "idle_fraction": mean([s.idle_fraction for s in self.busy]),
                "steps": len(self.busy), "completed": len(done), "failed": len(self.outputs) - len(done)}


def serve(llm, specs, progress=True) -> Run:
    """Replay arrivals in real time against the engine (all ranks call this in lockstep)."""
    from engine import SamplingParams
    eng = llm.engine
    group = eng.group
    bar = None
    if progress and group.is_leader:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), desc=llm.config.scheduler, unit="req", file=sys.stderr)
    t0 = group.broadcast(time.time())
    i, ids, finished = 0, [], 0
    while True:
        new, done = [], False
        if group.is_leader:
            now = time.time() - t0
            if not eng.has_unfinished() and i < len(specs) and specs[i].arrival_s > now:
                time.sleep(specs[i].arrival_s - now)   # idle: wait for the next arrival
                now = time.time() - t0
            while i < len(specs) and specs[i].arrival_s <= now:
                new.append(i)
                i += 1
            done = not new and i == len(specs) and not eng.has_unfinished()   # arrivals just read still run
        new, done = group.broadcast((new, done))
        if done:
            break
        for k in new:
            s = specs[k]
            sp = SamplingParams(temperature=0, max_tokens=s.max_tokens, ignore_eos=True,
                                priority=s.priority, session_id=s.session_id)
            ids.append(eng.add_request(s.prompt_token_ids, sp, request_id=f"r{k}",
                                       arrival_time=t0 + s.arrival_s))
        changed = eng.step()
        if bar is not None:
            n = sum(1 for o in changed if o.finished)
            finished += n
            bar.update(n)
    if bar is not None:
        bar.close()
    return Run([eng.outputs[r] for r in ids], eng.steps, t0)


def serve_instances(llm, specs) -> Run:
    """Multi-instance mode: a feeder thread on rank 0 adds each request to the global scheduler at
    its arrival time; every instance steps until the scheduler says all is done."""
    import threading
    from engine import SamplingParams
    from engine import distributed
    t0 = distributed.broadcast_from_rank0(time.time())
    server = llm.server
    if server is not None:
        coord = server.coordinator
        coord.closed = False

        def feed():
            for k, s in enumerate(specs):
                time.sleep(max(0.0, t0 + s.arrival_s - time.time()))
                with server.lock:
                    coord.add_request(s.prompt_token_ids, SamplingParams(
                        temperature=0, max_tokens=s.max_tokens, ignore_eos=True, priority=s.priority,
                        session_id=s.session_id), request_id=f"r{k}", arrival_time=t0 + s.arrival_s)
            with server.lock:
                coord.closed = True
        threading.Thread(target=feed, daemon=True).start()
    distributed.barrier()
    llm.run_until_stopped()
    distributed.barrier()   # every instance has reported its last step before anyone moves on
    if server is None:
        return None
    return Run([coord.outputs[f"r{k}"] for k in range(len(specs))], coord.steps, t0)


def _http_runs(a, specs, results, runs):
    """--url: the same workload through each HTTP server (rank 0 is the only client)."""
    from bench.http_client import replay
    for u in a.url:
        label, url = u.split("=", 1) if "=" in u.split("://")[0] else (f"http:{u}", u)
        runs[label] = replay(url, specs, api_key=a.api_key)
        results[label] = dict(runs[label].summary(), server_ttft_mean_s=runs[label].server_ttft_mean_s)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    from engine import LLM
    from model.config import load_config
    sched = a.scheduler if a.scheduler is not None else ("" if a.url else "immediate-rr,immediate-lb,sbs")
    names = [n for n in sched.split(",") if n]
    engine_opts = {k: _value(v) for k, v in (o.split("=", 1) for o in a.opt)}
    sched_opts = {}
    for o in a.sched_opt:
        name, kv = o.split(":", 1)
        k, v = kv.split("=", 1)
        sched_opts.setdefault(name, {})[k] = _value(v)
    specs = build_workload(a, load_config(a.model).vocab_size)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        print(f"{len(specs)} requests over {specs[-1].arrival_s:.1f} s, "
              f"{os.environ.get('WORLD_SIZE', '1')} rank(s)", file=sys.stderr)
    results, runs = {}, {}
    for name in names:
        llm = LLM(a.model, scheduler=name.split("@")[0], scheduler_options=sched_opts.get(name, {}),
                  **engine_opts)
        llm.generate([specs[0].prompt_token_ids[:8]] * 2, None)   # warm-up outside the clock
        if llm.coordinator is not None:
            llm.coordinator.steps.clear()
        run = serve_instances(llm, specs) if llm.config.instances > 1 else serve(llm, specs)
        if run is not None:
            results[name], runs[name] = run.summary(), run
        if llm.server is not None:
            llm.server.close()
    if a.url:
        if rank0:
            _http_runs(a, specs, results, runs)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()   # the other ranks wait: one that left early would take the job down
    if not rank0:
        return results
    if a.peer == "vllm":   # its offline engine stepping in real time (bench/peer_vllm.py)
        from bench.peer_vllm import replay
        results["vllm"], runs["vllm"] = replay(a.model, specs, a.peer_python, threads=a.threads, **{
            k: engine_opts[k] for k in ("max_num_seqs", "max_num_batched_tokens") if k in engine_opts})
    print(table(results))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"config": vars(a), "schedulers": results}, f, indent=1)
        plot(a.out, runs, {})
        print(f"wrote {a.out}/results.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
