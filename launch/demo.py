"""Generate a few completions on a checkpoint and print them with TTFT and throughput.

    python -m launch.demo [--model DIR] [--max-tokens 48] [--temperature 0] [--check]
    torchrun --nproc-per-node 2 -m launch.demo --check      # DP=EP=2 (what `make run` does)

The default model is the committed checkpoints/tiny-v3-trained (a small DeepSeek-V3 trained on the
Python language reference). --check runs transformers' greedy generate on the same checkpoint and
prints whether each completion is the same token for token.
"""
import argparse
import os
import time

from engine import LLM, SamplingParams

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "checkpoints", "tiny-v3-trained")
PROMPTS = ["The assert statement", "The import statement", "A function definition",
           "The while loop", "Exceptions"]


def transformers_greedy(model_dir: str, prompt_ids: list[list[int]], max_tokens: int, dtype: str):
    """Greedy continuations by transformers, stopping at EOS as the engine does (both keep the EOS id)."""
    import torch
    from transformers import AutoModelForCausalLM
    dt = {"auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            outs.append(hf.generate(x, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                                    eos_token_id=hf.config.eos_token_id)[0, len(ids):].tolist())
    return outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--check", action="store_true", help="compare greedy text with transformers'")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: five built-in ones")
    a = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        ap.error(f"no checkpoint at {a.model} (config.json missing)")
    if a.check and a.temperature != 0:
        ap.error("--check compares greedy text: use --temperature 0")
    prompts = a.prompt or PROMPTS
    llm = LLM(a.model, dtype=a.dtype)
    params = [SamplingParams(temperature=a.temperature, top_p=0.95 if a.temperature else 1.0,
                             max_tokens=a.max_tokens, seed=a.seed + i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return   # under torchrun every rank has the outputs; one prints them
    ref = None
    if a.check:
        ref = transformers_greedy(a.model, [llm.tokenizer.encode(p) for p in prompts], a.max_tokens, a.dtype)
    for i, o in enumerate(outs):
        print(f"--- {o.prompt!r} -> {o.text!r}")
        same = "" if ref is None else ("  [same as transformers]" if o.token_ids == ref[i] else
                                        f"  [DIFFERS from transformers: {llm.tokenizer.decode(ref[i])!r}]")
        print(f"    {len(o.token_ids)} tokens, finish={o.finish_reason}, "
              f"TTFT {o.metrics.ttft * 1e3:.1f} ms{same}")
    n = sum(len(o.token_ids) for o in outs)
    print(f"{len(outs)} requests, {n} output tokens in {wall:.2f} s: {n / wall:.1f} tok/s "
          f"on {os.environ.get('WORLD_SIZE', '1')} rank(s)")
    if ref is not None:
        same = sum(o.token_ids == r for o, r in zip(outs, ref))
        print(f"greedy text equal to transformers' on {same} of {len(outs)} prompts")


if __name__ == "__main__":
    main()
