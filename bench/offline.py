"""Offline throughput: LLM.generate against a peer engine, same checkpoint and prompts, one invocation.

    python -m bench.offline [--model DIR | --preset tiny-v3] [--peer transformers|vllm]
                            [--peer-python PATH] [--num-prompts 48] [--min-len 16] [--max-len 256]
                            [--output-len 64] [--modes greedy,sampled] [--temperature 0.7 --top-p 0.9]
                            [--runs 1] [--threads N] [--dtype auto|bfloat16] [--hf-batch 16]

Peers: transformers' batched `generate` (default, in this process), or vLLM's CPU build in its own
interpreter (`--peer-python` or STAGGER_VLLM_PYTHON; see bench/peer_vllm.py), started once and kept
for every run. Each run draws fresh prompts (a new seed per run and mode) so no side profits from a prefix
cache, runs both sides on them (alternating which goes first) and prints both throughputs and the
ratio; several runs end with the median and range. Output length is fixed (EOS ignored).

Agreement: how many sequences our engine and the peer generate token for token alike, and how many
first tokens of each equal transformers' greedy next token (one forward per prompt, untimed). With
sampling (temperature > 0) the engines draw from different random streams, so only the first-token
check against the greedy choice says something, and only loosely.
"""
import argparse
import os
import random
import statistics
import tempfile
import time

import torch


def workload(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


class Stagger:
    """Our engine, loaded once, warmed up once."""

    def __init__(self, model_dir, **opts):
        from engine import LLM, SamplingParams
        self.llm, self.SamplingParams = LLM(model_dir, **opts), SamplingParams
        self.llm.generate([[2, 3, 4, 5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=2))

    def generate(self, prompts, out_len, temperature=0.0, top_p=1.0, seed=0):
        """-> (token ids per prompt, seconds)."""
        sp = [self.SamplingParams(temperature=temperature, top_p=top_p, max_tokens=out_len, ignore_eos=True,
                                  seed=None if temperature == 0 else seed + k) for k in range(len(prompts))]
        t = time.perf_counter()
        outs = self.llm.generate(prompts, sp)
        return [o.token_ids for o in outs], time.perf_counter() - t


def run_stagger(model_dir, prompts, out_len, **opts):
    """-> (output tokens, seconds) of one greedy run (kept for other benchmarks)."""
    toks, wall = Stagger(model_dir, **opts).generate(prompts, out_len)
    return sum(map(len, toks)), wall


def _hf_model(model_dir, device="cpu", dtype=torch.float32):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def hf_generate(model, prompts, out_len, batch, temperature=0.0, top_p=1.0, device="cpu"):
    """transformers' batched generate (left padding) -> (token ids per prompt, seconds)."""
    toks, t = [], time.perf_counter()
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else \
        dict(do_sample=False)
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)   # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                                 pad_token_id=0, eos_token_id=None, **sample)
            toks += out[:, width:].tolist()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return toks, time.perf_counter() - t


def run_transformers(model_dir, prompts, out_len, batch, device="cpu", dtype=torch.float32):
    """transformers' batched greedy generate -> (output tokens, seconds)."""
    toks, wall = hf_generate(_hf_model(model_dir, device, dtype), prompts, out_len, batch, device=device)
    return sum(map(len, toks)), wall


def hf_first_tokens(model, prompts) -> list[int]:
    """transformers' greedy next token after each prompt (one unpadded forward each)."""
    with torch.no_grad():
        return [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]


def agreement(ours, theirs, first_ref) -> dict:
    return {"same_seq": sum(a == b for a, b in zip(ours, theirs)),
            "ours_first_ok": sum(bool(a) and a[0] == r for a, r in zip(ours, first_ref)),
            "peer_first_ok": sum(bool(b) and b[0] == r for b, r in zip(theirs, first_ref))}


def _spread(xs):
    return f"median {statistics.median(xs):.2f} (range {min(xs):.2f}-{max(xs):.2f})"


def _one_run(run, a, vocab, ours, peer, hf, sp, prompt_seed) -> dict:
    """Fresh prompts (seed `prompt_seed`), both sides on them; the side going first alternates."""
    prompts = workload(a.num_prompts, a.min_len, a.max_len, vocab, seed=prompt_seed)
    sides = {}
    for side in (("ours", "peer") if run % 2 == 0 else ("peer", "ours")):
        if side == "ours":
            sides[side] = ours.generate(prompts, a.output_len, seed=run * 1000, **sp)
        elif peer is not None:
            r = peer.generate(prompts, a.output_len, seed=run * 1000, **sp)
            sides[side] = (r["token_ids"], r["wall_s"])
        else:
            sides[side] = hf_generate(hf, prompts, a.output_len, a.hf_batch, **sp)
    (ot, ow), (pt, pw) = sides["ours"], sides["peer"]
    agree = agreement(ot, pt, hf_first_tokens(hf, prompts))
    row = dict(ours=sum(map(len, ot)) / ow, peer=sum(map(len, pt)) / pw, **agree)
    row["ratio"] = row["ours"] / row["peer"]
    n = len(prompts)
    print(f"run {run + 1}: stagger {row['ours']:7.1f} tok/s | {a.peer} {row['peer']:7.1f} tok/s | "
          f"ratio {row['ratio']:.2f}x | same sequence {agree['same_seq']}/{n} | first token = transformers "
          f"greedy: stagger {agree['ours_first_ok']}/{n}, {a.peer} {agree['peer_first_ok']}/{n}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", default="tiny-v3")
    ap.add_argument("--peer", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--peer-python", help="vLLM's interpreter (default: $STAGGER_VLLM_PYTHON)")
    ap.add_argument("--peer-eager", action="store_true", help="vLLM with enforce_eager (no inductor compile)")
    ap.add_argument("--peer-dtype", default="float32", help="vLLM's dtype (float32 | bfloat16)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--modes", default="greedy", help="greedy, sampled or both (comma-separated): each "
                    "mode runs --runs times against the same peer process")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampled mode")
    ap.add_argument("--top-p", type=float, default=0.9, help="sampled mode")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="our engine's dtype (auto: fp32 on CPU)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="our engine option")
    a = ap.parse_args(argv)
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    modes = [m for m in a.modes.split(",") if m]
    if not modes or any(m not in ("greedy", "sampled") for m in modes):
        ap.error(f"--modes: greedy and/or sampled, got {a.modes!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model
    if model_dir is None:
        from launch.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(os.path.join(tempfile.mkdtemp(), "ckpt"), a.preset)
    from bench.serving import _value
    from model.config import load_config
    vocab = load_config(model_dir).vocab_size
    opts = dict(max_num_seqs=64, max_num_batched_tokens=4096, dtype=a.dtype)
    opts.update({k: _value(v) for k, v in (o.split("=", 1) for o in a.opt)})
    peer = None
    if a.peer == "vllm":   # started first: its start-up (and compile) happens before anything is timed
        from bench.peer_vllm import VllmPeer
        peer = VllmPeer(model_dir, a.peer_python, enforce_eager=a.peer_eager, threads=a.threads,
                        dtype=a.peer_dtype,
                        max_num_seqs=opts["max_num_seqs"],
                        max_num_batched_tokens=opts["max_num_batched_tokens"])
        print(f"vllm {peer.info['vllm']} (torch {peer.info['torch']}, {a.peer_dtype}, "
              f"{f'{a.threads} thread(s)' if a.threads else 'its default threads'}, "
              f"{'eager' if a.peer_eager else 'compiled'}), start-up {peer.info['startup_s']:.0f} s")
    ours = Stagger(model_dir, **opts)
    hf = _hf_model(model_dir)
    print(f"workload: {a.num_prompts} prompts of {a.min_len}-{a.max_len} tokens, {a.output_len} output tokens"
          f" each; stagger dtype {a.dtype}; torch threads {torch.get_num_threads()}")
    rows = {}
    try:
        for m, mode in enumerate(modes):
            sp = dict(temperature=0.0, top_p=1.0) if mode == "greedy" else \
                dict(temperature=a.temperature, top_p=a.top_p)
            print(f"-- {mode}" + ("" if mode == "greedy" else f" (temperature {sp['temperature']}, "
                                                              f"top_p {sp['top_p']})"))
            # prompts never repeat across modes either: our prefix cache (vLLM's is off for MLA on
            # CPU) would otherwise skip the second mode's prefills
            rows[mode] = [_one_run(run, a, vocab, ours, peer, hf, sp, prompt_seed=1000 * m + run)
                          for run in range(a.runs)]
            if a.runs > 1:
                rs = rows[mode]
                print(f"{mode}: stagger tok/s {_spread([r['ours'] for r in rs])}; "
                      f"{a.peer} tok/s {_spread([r['peer'] for r in rs])}; "
                      f"ratio stagger/{a.peer} {_spread([r['ratio'] for r in rs])}", flush=True)
    finally:
        if peer is not None:
            peer.close()
    return rows


if __name__ == "__main__":
    main()
