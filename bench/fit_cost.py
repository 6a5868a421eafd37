"""Fit the simulator's LinearCost step-time model to the real engine's measured step times.

    python -m bench.fit_cost --model .cache/small-v3 --out bench/out/fit_cpu.json

Runs the engine (one process, CPU or whatever device it picks) over a sweep of batch shapes:
k requests of prompt length L, for a grid of (k, L), each run to completion, once with all k added
at once and once staggered (one new request every --stagger steps). That gives prefill steps (chunks
of up to --max-num-batched-tokens tokens over growing cached context), decode steps of k sequences
over context ~L, and mixed steps (a prefill beside running decodes, as in online serving). Every
step's wall time (around engine.step()) is recorded with what the rank computed, measured the way
the simulator's RankWork does it:
tokens, seqs and attention context in query-key pairs (scheduler.allocation.attention_pairs).
Then t = c0 + c_tok*tokens + c_ctx*context + c_seq*seqs is fitted by least squares on a random
80 % of the steps, scored on the other 20 % (R^2, mean absolute % error), refitted on all steps
and written as the JSON that `make_cost_model("fitted:FILE", n)` reads.
"""
import argparse
import json
import random
import sys
import time

import numpy as np

from scheduler.allocation import attention_pairs

FEATURES = ("c0", "c_tok", "c_ctx", "c_seq")


def design(records) -> np.ndarray:
    """Rows [1, tokens, context, seqs] for records with keys tokens, context, seqs."""
    return np.array([[1.0, r["tokens"], r["context"], r["seqs"]] for r in records], dtype=float)


def fit(records, relative: bool = True) -> dict:
    """Least-squares coefficients {c0, c_tok, c_ctx, c_seq}, clipped at 0 (a negative cost is
    not physical; a clipped coefficient's column is dropped and the rest refitted).
    relative: minimize squared *relative* error (rows weighted 1/t), so 10 ms decode steps count as
    much as 2 s prefill steps, and steps slowed down by other load on the machine count for less."""
    x, y = design(records), np.array([r["time_s"] for r in records], dtype=float)
    if relative:
        x, y = x / y[:, None], np.ones_like(y)
    keep = list(range(len(FEATURES)))
    while True:
        # columns scaled to unit norm so the tiny context coefficient is well conditioned
        xs = x[:, keep]
        scale = np.linalg.norm(xs, axis=0)
        scale[scale == 0] = 1.0
        beta = np.linalg.lstsq(xs / scale, y, rcond=None)[0] / scale
        neg = [k for k, b in zip(keep, beta) if b < 0]
        if not neg:
            break
        keep.remove(min(neg, key=lambda k: beta[keep.index(k)]))
    coef = dict.fromkeys(FEATURES, 0.0)
    coef.update({FEATURES[k]: float(b) for k, b in zip(keep, beta)})
    return coef


def predict(coef: dict, records) -> np.ndarray:
    return design(records) @ np.array([coef[f] for f in FEATURES])


def quality(coef: dict, records) -> dict:
    y = np.array([r["time_s"] for r in records])
    p = predict(coef, records)
    ss_res, ss_tot = float(((y - p) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"r2": 1 - ss_res / ss_tot if ss_tot else float("nan"),
            "mape": float(np.mean(np.abs(p - y) / y)), "steps": len(records)}


def split(records, holdout: float, seed: int):
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n = max(1, int(len(idx) * holdout))
    return [records[i] for i in idx[n:]], [records[i] for i in idx[:n]]


def write(path: str, coef: dict, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"coefficients": coef, **meta}, f, indent=1)


# ---- measuring the engine ------------------------------------------------------------------------
def measure(llm, shapes, max_tokens: int, seed: int = 0, log=None) -> list[dict]:
    """Run each (k, L, stagger): k requests of L random tokens, `max_tokens` outputs, the i-th added
    before step i*stagger (0: all at once); one record per step (empty steps are not recorded)."""
    from engine import SamplingParams
    eng = llm.engine
    sched = eng.worker.scheduler
    orig, last = sched.schedule, []

    def spy(*args, **kwargs):   # what the rank computes this step, as the simulator's RankWork counts it
        b = orig(*args, **kwargs)
        last[:] = [(r.num_computed_tokens, n) for r, n in b.items]
        return b
    sched.schedule = spy
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    records = []
    try:
        for k, L, stagger in shapes:
            step, added = 0, 0
            while added < k or eng.has_unfinished():
                while added < k and added * stagger <= step:
                    eng.add_request([rng.randrange(2, vocab) for _ in range(L)], sp)
                    added += 1
                step += 1
                last.clear()
                t0 = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t0
                if last:
                    records.append({"time_s": dt, "tokens": sum(n for _, n in last), "seqs": len(last),
                                    "context": sum(attention_pairs(n, c) for c, n in last),
                                    "shape": [k, L, stagger]})
            if log:
                log(f"k={k:3d} L={L:5d} stagger={stagger}: {len(records)} steps so far")
    finally:
        sched.schedule = orig
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="JSON for --cost-model fitted:FILE")
    p.add_argument("--ranks", type=int, default=1, help="only 1 (single process) is measured")
    p.add_argument("--batch-sizes", default="1,4,16,32")
    p.add_argument("--prompt-lens", default="32,128,512,1024")
    p.add_argument("--max-shape-tokens", type=int, default=8192, help="skip shapes with k*L above this")
    p.add_argument("--stagger", type=int, default=2, help="steps between staggered arrivals")
    p.add_argument("--max-tokens", type=int, default=8, help="decode steps per shape")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: steadier timings on a shared machine)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", help="also write the raw step records here (JSON)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.ranks != 1:
        raise SystemExit("--ranks > 1 is not measured yet: run one process (the fit is per rank)")
    import torch
    torch.set_num_threads(a.threads)
    from engine import LLM, SamplingParams

    def log(m):
        print(m, file=sys.stderr, flush=True)

    llm = LLM(a.model, scheduler="immediate-rr", enable_prefix_caching=False,
              max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs)
    llm.generate([[5] * 32] * 2, SamplingParams(max_tokens=4, ignore_eos=True))   # warm-up
    shapes = [(k, L, st) for st in (0, a.stagger) for k in map(int, a.batch_sizes.split(","))
              for L in map(int, a.prompt_lens.split(",")) if k * L <= a.max_shape_tokens]
    t0 = time.time()
    records = measure(llm, shapes, a.max_tokens, a.seed, log)
    train, test = split(records, a.holdout, a.seed)
    held = quality(fit(train), test)
    coef = fit(records)
    full = quality(coef, records)
    print(f"{len(records)} steps in {time.time() - t0:.0f} s; coefficients: "
          + ", ".join(f"{k}={v:.4g}" for k, v in coef.items()))
    print(f"held-out ({held['steps']} steps): R^2={held['r2']:.3f}  mean |err|={100 * held['mape']:.1f} %")
    print(f"all steps ({full['steps']}):      R^2={full['r2']:.3f}  mean |err|={100 * full['mape']:.1f} %")
    write(a.out, coef, {"model": a.model, "device": str(llm.engine.worker.runner.device),
                        "threads": a.threads, "ranks": 1,
                        "max_num_batched_tokens": a.max_num_batched_tokens, "heldout": held, "all": full,
                        "shapes": shapes, "max_tokens": a.max_tokens})
    if a.records:
        with open(a.records, "w") as f:
            json.dump(records, f)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
