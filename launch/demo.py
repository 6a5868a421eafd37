"""Generate a few completions on a checkpoint and print them with TTFT and throughput.

    python -m launch.demo --model DIR [--max-tokens 32] [--temperature 0.8]
    torchrun --nproc-per-node 2 -m launch.demo --model DIR     # DP=EP=2 (what `make run` does)
"""
import argparse
import os
import time

from engine import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time", "Staggered batch scheduling",
           "The weather today is", "Numbers: 0 1 2 3"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    llm = LLM(a.model)
    params = [SamplingParams(temperature=a.temperature, top_p=0.95, max_tokens=a.max_tokens, seed=a.seed + i)
              for i in range(len(PROMPTS))]
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, params)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", 0)) != 0:
        return   # under torchrun every rank has the outputs; one prints them
    for o in outs:
        print(f"--- {o.prompt!r} -> {o.text!r}")
        print(f"    {len(o.token_ids)} tokens, finish={o.finish_reason}, TTFT {o.metrics.ttft * 1e3:.1f} ms")
    n = sum(len(o.token_ids) for o in outs)
    print(f"{len(outs)} requests, {n} output tokens in {wall:.2f} s: {n / wall:.1f} tok/s "
          f"on {os.environ.get('WORLD_SIZE', '1')} rank(s)")


if __name__ == "__main__":
    main()
