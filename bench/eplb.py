"""Expert-level load balancing on a skewed routing trace: per-rank load imbalance before and after.

    python -m bench.eplb [--experts 256] [--ranks 32] [--redundant 0,32] [--windows 20] [--zipf 1.1]

The trace: per window, tokens pick top-k experts with Zipf-skewed popularity that drifts between
windows (a slow random walk of expert popularity). The placement used in window w is planned from
window w-1's counts (EPLB always plans from the past); imbalance = max/mean expected tokens per
rank, averaged over windows. Pure Python, no GPU.
"""
import argparse
import random

from scheduler import expert_placement as eplb


def routing_trace(E, windows, tokens, k, zipf, drift, seed):
    rng = random.Random(seed)
    weight = [1.0 / (i + 1) ** zipf for i in range(E)]
    rng.shuffle(weight)
    for _ in range(windows):
        weight = [w * rng.lognormvariate(0, drift) for w in weight]
        counts = [0] * E
        for _ in range(tokens):
            for e in set(rng.choices(range(E), weights=weight, k=k)):
                counts[e] += 1
        yield counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--redundant", default="0,32")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--drift", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    trace = list(routing_trace(a.experts, a.windows, a.tokens, a.top_k, a.zipf, a.drift, a.seed))
    print(f"{a.experts} experts top-{a.top_k} on {a.ranks} ranks, {a.windows} windows of {a.tokens} tokens, "
          f"zipf {a.zipf}, drift {a.drift}")
    print(f"{'placement':34s} {'imbalance (max/mean)':>22s}")
    for R in (int(r) for r in a.redundant.split(",")):
        static = eplb.default_placement(a.experts, a.ranks, R)
        base = [eplb.imbalance(eplb.rank_loads(static, c)) for c in trace[1:]]
        planned = [eplb.imbalance(eplb.rank_loads(eplb.plan(prev, a.ranks, R), cur))
                   for prev, cur in zip(trace, trace[1:])]
        oracle = [eplb.imbalance(eplb.rank_loads(eplb.plan(c, a.ranks, R), c)) for c in trace[1:]]

        def mean(xs):
            return sum(xs) / len(xs)
        print(f"{'contiguous, ' + str(R) + ' redundant':34s} {mean(base):22.3f}")
        print(f"{'EPLB from last window, ' + str(R) + ' redundant':34s} {mean(planned):22.3f}")
        print(f"{'EPLB oracle (same window), ' + str(R) + ' red.':34s} {mean(oracle):22.3f}")


if __name__ == "__main__":
    main()
