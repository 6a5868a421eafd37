"""End-to-end on one device: offline and online (Poisson) runs, the decode step against its
roofline, and transformers' generate on the same checkpoint in the same run.

    python -m bench.e2e --model DIR                      # or --preset moonlight|v2-lite [--fp8]
        [--num-prompts 64] [--input-len 512] [--output-len 128] [--rate 4] [--online-requests 64]
        [--hf-prompts 8] [--skip-hf]

Decode roofline: bytes one decode step must read (the active weights: attention, dense and shared
layers, and the routed experts the batch's tokens touch, plus the latent KV of every sequence)
divided by the copy bandwidth measured on this device. Written for a Hopper GPU (issue 9); it
also runs on CPU with a tiny checkpoint as a smoke test (figures then mean little).
"""
import argparse
import os
import random
import tempfile
import time

import torch


def copy_gbps(device) -> float:
    """Measured copy bandwidth (bytes read + written): the kernels' helper on CUDA."""
    if device.type == "cuda":
        from bench._gpu import measure_copy_gbps
        return measure_copy_gbps()
    a = torch.empty(1 << 28, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 2 * a.numel() * 5 / (time.perf_counter() - t) / 1e9


def decode_bytes(cfg, batch: int, context: int, elem: int) -> float:
    """Bytes one decode step reads: weights touched plus the KV cache of every sequence."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    q = (h * H * cfg.qk_head_dim if cfg.q_lora_rank is None
         else h * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim)
    attn = q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * h
    expert = 3 * h * cfg.moe_intermediate_size
    total = cfg.vocab_size * h * 2   # embedding rows are few; lm_head is read whole
    for i in range(cfg.num_hidden_layers):
        total += attn
        if cfg.is_moe_layer(i):
            # distinct experts touched by `batch` tokens choosing k of E uniformly
            E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            touched = E * (1 - (1 - k / E) ** batch)
            total += expert * (touched + cfg.n_shared_experts) + h * E
        else:
            total += 3 * h * cfg.intermediate_size
    kv = cfg.num_hidden_layers * batch * context * cfg.kv_cache_dim
    return total * elem + kv * elem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", default="moonlight")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--online-requests", type=int, default=64)
    ap.add_argument("--hf-prompts", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    from engine import LLM, SamplingParams
    from model.config import load_config
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = a.model
    if model_dir is None:
        from launch.make_checkpoint import make_checkpoint
        model_dir = make_checkpoint(os.path.join(tempfile.mkdtemp(), a.preset), a.preset, fp8=a.fp8,
                                    dtype=torch.bfloat16, tokenizer="none")
    cfg = load_config(model_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, cfg.vocab_size) for _ in range(a.input_len)] for _ in range(a.num_prompts)]
    sp = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    llm = LLM(model_dir, device=str(device), max_num_seqs=max(64, a.num_prompts))
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))   # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    steps = [s for s in llm.coordinator.steps if s.tokens_per_rank[0] == a.num_prompts]   # pure decode steps
    step_s = sorted(s.step_time_s for s in steps)[len(steps) // 2] if steps else float("nan")
    gbps = copy_gbps(device)
    elem = 1 if a.fp8 else 2 if device.type == "cuda" else 4
    roof = decode_bytes(cfg, a.num_prompts, a.input_len + a.output_len // 2, elem) / (gbps * 1e9)
    ttft = sorted(o.metrics.ttft for o in outs)
    tpot = [o.metrics.tpot for o in outs if o.metrics.tpot]
    print(f"device {device}, copy {gbps:.0f} GB/s; {a.num_prompts} x ({a.input_len} in, {a.output_len} out)")
    print(f"offline: {n / wall:.1f} output tok/s; TTFT median {ttft[len(ttft) // 2] * 1e3:.1f} ms; "
          f"TPOT mean {sum(tpot) / len(tpot) * 1e3:.2f} ms")
    print(f"decode step (batch {a.num_prompts}) median {step_s * 1e3:.2f} ms; roofline {roof * 1e3:.2f} ms; "
          f"ratio {step_s / roof:.2f}x")
    from bench.serving import serve
    from scheduler.sim.workload import synthetic
    specs = synthetic(a.rate, a.online_requests / a.rate, lambda: (a.input_len, a.output_len), rng, "poisson")
    for s in specs:
        s.prompt_token_ids = [rng.randrange(2, cfg.vocab_size) for _ in range(s.prompt_len)]
    run = serve(llm, specs, progress=False).summary()
    print(f"online Poisson {a.rate} req/s, {len(specs)} requests: "
          f"TTFT mean {run['ttft_mean_s'] * 1e3:.1f} ms, "
          f"P99 {run['ttft_p99_s'] * 1e3:.1f} ms, TPOT {run['tpot_mean_s'] * 1e3:.2f} ms, "
          f"{run['throughput_tok_s']:.1f} tok/s")
    if a.skip_hf:
        return
    from bench.offline import run_transformers
    hf_n, hf_wall = run_transformers(model_dir, prompts[:a.hf_prompts], a.output_len, a.hf_prompts, device,
                                     llm.engine.worker.runner.kv_caches[0].dtype)
    hf_tps = hf_n / hf_wall
    print(f"transformers generate (batch {a.hf_prompts}): {hf_tps:.1f} tok/s; stagger/transformers "
          f"{(n / wall) / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
