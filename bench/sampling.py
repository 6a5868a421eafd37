"""Sampled vs greedy decoding cost at DeepSeek-V3's 129,280-token vocabulary (issue 14).

    python -m bench.sampling [--runs 3] [--num-prompts 32] [--output-len 32] [--hidden 256] [--layers 3]

One random V3-style model (V3's vocabulary, small hidden size, a few layers) and one engine; greedy
and sampled (temperature 0.7, top_p 0.9, top_k 50) runs alternate, the same prompts each time.
Prints each run, then the median and range of sampled/greedy wall and process CPU time (CPU time
is what to quote on a shared, loaded machine), and the sampler alone on [batch, 129280] logits:
the batched sampler against the per-row host loop it replaced (kept here as the baseline).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch


def model_dir(hidden: int, layers: int) -> str:
    from launch.make_checkpoint import PRESETS, _COMMON, write_checkpoint
    raw = dict(_COMMON, **PRESETS["small-v3"])
    raw.update(vocab_size=129280, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
               moe_intermediate_size=hidden // 2, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4)
    out = os.path.join(tempfile.mkdtemp(), "v3vocab")
    write_checkpoint(out, raw)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    from engine import LLM, SamplingParams
    path = model_dir(a.hidden, a.layers)
    llm = LLM(path, device=a.device, max_num_seqs=a.num_prompts, max_num_batched_tokens=4096)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 129280, (a.prompt_len,), generator=g).tolist() for _ in range(a.num_prompts)]
    modes = {"greedy": SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True),
             "sampled": SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=a.output_len,
                                       ignore_eos=True)}
    llm.generate(prompts[:2], SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=2))  # warm-up
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for r in range(a.runs):
        for m, sp in modes.items():
            t, c = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, sp)
            times[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
            assert sum(len(o.token_ids) for o in outs) == a.num_prompts * a.output_len
            print(f"run {r} {m:8s} wall {times[m][-1]:7.3f} s  cpu {cpu[m][-1]:7.3f} s")
    ratios = [s / g for s, g in zip(times["sampled"], times["greedy"])]
    cratios = [s / g for s, g in zip(cpu["sampled"], cpu["greedy"])]
    print(f"model: vocab 129280, hidden {a.hidden}, {a.layers} layers; {a.num_prompts} prompts x "
          f"{a.prompt_len} tokens -> {a.output_len} tokens; {a.runs} runs")
    for m in modes:
        print(f"{m:8s} median {statistics.median(times[m]):7.3f} s ({_range(times[m])})")
    print(f"sampled/greedy wall: median {statistics.median(ratios):.3f} ({_range(ratios)})")
    print(f"sampled/greedy cpu:  median {statistics.median(cratios):.3f} ({_range(cratios)})")
    sampler_only(a.num_prompts)


def _range(xs) -> str:
    return f"range {min(xs):.3f}-{max(xs):.3f}"


def _per_row_baseline(logits, params, gens):
    """The sampler before issue 14: filter and draw row by row on the host, full-vocabulary sort."""
    out = []
    for i, p in enumerate(params):
        x = logits[i].cpu() / p.temperature
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
        probs = x.softmax(-1)
        sp, order = probs.sort(descending=True)
        drop = (sp.cumsum(-1) - sp) >= p.top_p
        probs = x.masked_fill(drop.scatter(0, order, drop), float("-inf")).softmax(-1)
        out.append(int((probs / torch.empty_like(probs).exponential_(generator=gens[i])).argmax()))
    return out


def sampler_only(batch: int, reps: int = 10):
    from engine.sampling import Sampler, SamplingParams
    logits = torch.randn(batch, 129280, generator=torch.Generator().manual_seed(0)) * 4
    sp = [SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=i) for i in range(batch)]
    ids = [str(i) for i in range(batch)]
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    s = Sampler()
    fns = {"greedy argmax": lambda: logits.argmax(-1).tolist(), "batched sampler": lambda: s(logits, ids, sp),
           "per-row baseline": lambda: _per_row_baseline(logits, sp, gens)}
    print(f"sampler alone, batch {batch} x vocab 129280, {reps} calls each (process CPU ms per call):")
    for name, fn in fns.items():
        fn()
        runs = []
        for _ in range(3):
            c = time.process_time()
            for _ in range(reps):
                fn()
            runs.append((time.process_time() - c) / reps * 1e3)
        print(f"  {name:18s} median {statistics.median(runs):8.2f} ms ({_range(runs)})")


if __name__ == "__main__":
    main()
