"""Where an offline run's time goes, by kind of work: CPU time of the calling thread spent in each
kernels.ops entry point and in the model's Linear layers, the lm_head among them (split at 64 rows
into prefill and decode GEMMs); "other" is everything else (embeddings, rope, residual adds and
other glue, the MLA absorb products, sampling, host work).

    python -m bench.breakdown --model DIR [--num-prompts 24] [--output-len 64] [--threads 1] [--runs 3]

Thread CPU time rather than wall time with one thread: a shared machine's scheduling noise stays
out, and it is the whole cost. With more threads the calling thread's CPU time misses the others'
work, so wall time is used instead (run it on a quiet machine). The torch profiler was not used: on
this CPU it charged whole milliseconds of other work to `index_select`, an order of magnitude more
than timing it directly.
Each run draws fresh prompts (bench.offline's workload) after one untimed warm-up run.
"""
import argparse
import collections
import statistics
import time

import torch

OPS = ["fused_moe", "mla_decode", "prefill_attention", "rms_norm", "route_v3", "write_kv", "gather_kv"]


def instrument(totals: dict, clock) -> None:
    """Wrap the op entry points and Linear.forward so that each call adds its CPU time to `totals`."""
    import kernels.ops as ops
    import model.deepseek as ds
    from bench.overhead import timed
    for name in OPS:
        timed(ops, name, totals, name, clock=clock)

    class Gemm:   # the same forward under two names, so that the two row regimes are timed apart
        prefill = decode = staticmethod(ds.Linear.forward)
    timed(Gemm, "prefill", totals, "dense GEMM prefill", clock=clock)
    timed(Gemm, "decode", totals, "dense GEMM decode", clock=clock)
    ds.Linear.forward = lambda self, x: (Gemm.prefill if x.shape[0] > 64 else Gemm.decode)(self, x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    totals = collections.defaultdict(float)
    clock, unit = (time.thread_time, "CPU-second") if a.threads == 1 else (time.perf_counter, "second (wall)")
    instrument(totals, clock)
    from bench.offline import workload
    from engine import LLM, SamplingParams
    from model.config import load_config
    llm, vocab = LLM(a.model), load_config(a.model).vocab_size
    sp = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(workload(a.num_prompts, a.min_len, a.max_len, vocab, seed=1000), sp)
    shares, rates = collections.defaultdict(list), []
    for run in range(a.runs):
        totals.clear()
        t = clock()
        llm.generate(workload(a.num_prompts, a.min_len, a.max_len, vocab, seed=run), sp)
        cpu = clock() - t
        rates.append(a.num_prompts * a.output_len / cpu)
        totals["other"] = cpu - sum(totals.values())
        for k, v in totals.items():
            shares[k].append(100 * v / cpu)
    print(f"{a.num_prompts} prompts of {a.min_len}-{a.max_len} tokens x {a.output_len}, "
          f"{a.threads} thread(s), {a.runs} runs: {statistics.median(rates):.1f} tok per {unit} "
          f"(range {min(rates):.1f}-{max(rates):.1f})")
    kind = "CPU" if a.threads == 1 else "wall"
    print(f"| kind of work | share of {kind} time, median (range) |\n|---|---|")
    for k in sorted(shares, key=lambda k: -statistics.median(shares[k])):
        s = shares[k]
        print(f"| {k} | {statistics.median(s):.1f} % ({min(s):.1f}-{max(s):.1f}) |")


if __name__ == "__main__":
    main()
