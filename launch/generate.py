"""Generate completions on one process or many (DP attention + EP experts under torchrun).

    torchrun --nproc-per-node 2 -m launch.generate --model DIR --prompt "Hello" [--prompt ...]
    python -m launch.generate --model DIR --prompts-file prompts.txt --max-tokens 32

Every rank runs this with the same arguments; rank 0 prints completions and timings.
"""
import argparse
import json
import os
import time

from engine import LLM, SamplingParams


def read_prompts(a) -> list:
    prompts = list(a.prompt or [])
    if a.prompts_file:
        with open(a.prompts_file) as f:
            for line in f:
                line = line.rstrip("\n")
                if line:   # a JSON list of ints is a token-id prompt, anything else is text
                    prompts.append(json.loads(line) if line.startswith("[") else line)
    if not prompts:
        raise SystemExit("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--prompts-file")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--scheduler", default="sbs")
    ap.add_argument("--json", action="store_true", help="print one JSON object per completion")
    a = ap.parse_args(argv)
    prompts = read_prompts(a)
    llm = LLM(a.model, scheduler=a.scheduler)
    params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, ignore_eos=a.ignore_eos,
                            seed=0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for o in outs:
        if a.json:
            print(json.dumps({"request_id": o.request_id, "token_ids": o.token_ids, "text": o.text,
                              "finish_reason": o.finish_reason,
                              "ttft_s": o.metrics.ttft if o.metrics else None,
                              "rank": o.metrics.rank if o.metrics else None}))
        else:
            ttft = f"{o.metrics.ttft * 1e3:.1f} ms" if o.metrics and o.metrics.ttft is not None else "-"
            print(f"[{o.request_id}] {o.prompt!r} -> {o.text!r} ({len(o.token_ids)} tokens, "
                  f"{o.finish_reason}, TTFT {ttft})")
    n = sum(len(o.token_ids) for o in outs)
    print(f"{len(outs)} requests, {n} tokens in {wall:.2f} s ({n / wall:.1f} tok/s) on "
          f"{os.environ.get('WORLD_SIZE', '1')} rank(s)")


if __name__ == "__main__":
    main()
