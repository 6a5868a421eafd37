"""Offline throughput: LLM.generate against transformers' batched generate, same checkpoint and prompts.

    python -m bench.offline [--model DIR | --preset tiny-v3] [--num-prompts 48] [--min-len 16]
                            [--max-len 256] [--output-len 64] [--hf-batch 16]

Both sides run greedy with a fixed output length (EOS ignored), in one process, one after the
other; the printed ratio is what to quote.
"""
import argparse
import os
import random
import tempfile
import time

import torch


def workload(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_stagger(model_dir, prompts, out_len, **opts):
    from engine import LLM, SamplingParams
    llm = LLM(model_dir, **opts)
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
    wall = time.perf_counter() - t
    return sum(len(o.token_ids) for o in outs), wall


def run_transformers(model_dir, prompts, out_len, batch, device="cpu", dtype=torch.float32):
    """transformers' batched greedy generate (left padding) -> (output tokens, seconds)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    n, t = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)   # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            n += (out.shape[1] - width) * len(chunk)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", default="tiny-v3")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model
    if model_dir is None:
        from launch.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(os.path.join(tempfile.mkdtemp(), "ckpt"), a.preset)
    from model.config import load_config
    prompts = workload(a.num_prompts, a.min_len, a.max_len, load_config(model_dir).vocab_size)
    ns, ts = run_stagger(model_dir, prompts, a.output_len, max_num_seqs=64, max_num_batched_tokens=4096)
    nh, th = run_transformers(model_dir, prompts, a.output_len, a.hf_batch)
    print(f"workload: {a.num_prompts} prompts of {a.min_len}-{a.max_len} tokens, {a.output_len} output tokens each")
    print(f"stagger       {ns:6d} tokens in {ts:7.2f} s = {ns / ts:8.1f} tok/s")
    print(f"transformers  {nh:6d} tokens in {th:7.2f} s = {nh / th:8.1f} tok/s (batch {a.hf_batch})")
    print(f"ratio stagger/transformers: {(ns / ts) / (nh / th):.2f}x")


if __name__ == "__main__":
    main()
