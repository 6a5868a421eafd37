"""Host time per engine step outside the model forward, at 1, 64 and 256 running sequences.

    python -m bench.overhead [--model DIR | --preset tiny-v3] [--seqs 1,64,256] [--steps 50]
                             [--prompt-len 32] [--temperature 0] [--threads 1]

The network's forward and logits are replaced by a stub returning preallocated tensors of the right
shapes (random logits over the real vocabulary), so what remains is what decides GPU speed once
graphs remove launch overhead: scheduling, input building, sampling, detokenization, stop checks
and the coordinator's plan/collect. Each component is timed by wrapping its method; "host" is the
step's wall time minus the stub. Decode steps only (every sequence is past its prompt).
"""
import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch


class _Stub(torch.nn.Module):
    """Stands in for DeepseekForCausalLM: the same two calls, (almost) no work."""

    def __init__(self, real, max_rows):
        super().__init__()
        self.cfg = real.cfg
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.zeros(max_rows, real.cfg.hidden_size)
        self.logits = torch.randn(max_rows, real.cfg.vocab_size, generator=g)

    def forward(self, input_ids, meta, kv_caches):
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden):
        return self.logits[: hidden.shape[0]]

    def moe_layers(self):
        return []


def timed(obj, name, acc, key, clock=time.perf_counter):
    """Replace obj.name by a wrapper that adds each call's time on `clock` to acc[key]."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = clock()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] += clock() - t
    setattr(obj, name, wrapper)


class _TimedSampler:
    def __init__(self, sampler, acc):
        self.sampler, self.acc = sampler, acc

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.sampler(*a, **kw)
        finally:
            self.acc["sample"] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def measure(model_dir, n_seqs, steps, prompt_len, temperature, top_p=1.0):
    from engine import LLM, SamplingParams
    max_rows = max(n_seqs * prompt_len, 4096)
    llm = LLM(model_dir, max_num_seqs=n_seqs, max_num_batched_tokens=max_rows, enable_prefix_caching=False)
    eng = llm.engine
    worker, coord = eng.worker, eng.coordinator
    worker.runner.model = _Stub(worker.runner.model, max_rows)
    sp = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=steps + 8, ignore_eos=True, seed=1)
    vocab = worker.runner.model.cfg.vocab_size
    for k in range(n_seqs):
        eng.add_request([2 + (k * 7 + j) % (vocab - 2) for j in range(prompt_len)], sp)
    for _ in range(3):                     # admit and prefill everything, warm up
        eng.step()
    acc = defaultdict(float)
    timed(worker.scheduler, "schedule", acc, "schedule")
    timed(worker.scheduler, "update", acc, "sched_update")
    timed(worker.runner, "prepare", acc, "prepare_inputs")
    # one call per step (_finish_tokens), or per sampled token in older trees (_finish_token)
    finish = "_finish_tokens" if hasattr(worker, "_finish_tokens") else "_finish_token"
    timed(worker, finish, acc, "detok_stop")
    timed(coord, "plan", acc, "coord_plan")
    timed(coord, "collect", acc, "coord_collect")
    worker.sampler = _TimedSampler(worker.sampler, acc)
    stub = worker.runner.model
    timed(stub, "forward", acc, "forward_stub")
    timed(stub, "compute_logits", acc, "forward_stub")
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    running = len(worker.scheduler.running) if hasattr(worker.scheduler, "running") else n_seqs
    res = {k: v / steps * 1e3 for k, v in acc.items()}
    res["step"] = statistics.median(walls) * 1e3
    res["step_mean"] = sum(walls) / steps * 1e3
    res["host"] = res["step_mean"] - res.get("forward_stub", 0.0)
    res["running"] = running
    return res


COLS = ["schedule", "prepare_inputs", "sample", "sched_update", "detok_stop", "coord_plan", "coord_collect"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", default="tiny-v3")
    ap.add_argument("--seqs", default="1,64,256")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model
    if model_dir is None:
        from launch.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(os.path.join(tempfile.mkdtemp(), "ckpt"), a.preset)
    from model.config import load_config
    print(f"model {a.model or a.preset} (vocab {load_config(model_dir).vocab_size}), {a.steps} decode steps, "
          f"{'greedy' if a.temperature == 0 else f'temperature {a.temperature} top_p {a.top_p}'}, "
          f"torch threads {torch.get_num_threads()}; ms per step")
    head = f"{'seqs':>5s}{'host':>8s}{'step':>8s}" + "".join(f"{c:>15s}" for c in COLS)
    print(head)
    out = {}
    for n in (int(s) for s in a.seqs.split(",")):
        r = measure(model_dir, n, a.steps, a.prompt_len, a.temperature, a.top_p)
        out[n] = r
        cells = "".join(f"{r.get(c, 0.0):15.3f}" for c in COLS)
        print(f"{n:5d}{r['host']:8.3f}{r['step_mean']:8.3f}" + cells,
              flush=True)
    return out


if __name__ == "__main__":
    main()
