"""Absorbed MLA decode microbenchmark: Triton kernel vs the torch reference (and FlashInfer's MLA
when importable), over the paged latent cache of DeepSeek-V3 (512 latent + 64 rope, page 64).

    python -m bench.bench_mla_decode [--heads 16,128] [--batch 1,8,32,64,128,256]
                                     [--context 1k,4k,8k,32k] [--q-len 1] [--page 64] [--list]

Per shape: time, achieved GB/s (cache bytes read: B x S x 576 x 2, plus q and out), fraction of
the measured copy bandwidth, TFLOP/s, and the ratios torch/triton and flashinfer/triton (> 1:
Triton faster). The issue's target: >= 75 % of copy bandwidth at 16 heads.
"""
import argparse
import itertools
import math
import sys

try:
    from bench._gpu import bench_ms, device_banner, parse_int_list, require_cuda, row
except ImportError:  # run as a file: bench/ is sys.path[0]
    from _gpu import bench_ms, device_banner, parse_int_list, require_cuda, row

D_LAT, D_PE = 512, 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="16,128", help="query heads per rank (V3: 128; 16 under TP/DP 8)")
    p.add_argument("--batch", default="1,8,32,64,128,256")
    p.add_argument("--context", default="1k,4k,8k,32k", help="tokens already in each sequence's cache")
    p.add_argument("--q-len", type=int, default=1, help="query tokens per sequence (MTP/speculative: 2+)")
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--max-cache-gb", type=float, default=40.0, help="skip shapes whose cache is larger")
    p.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference")
    p.add_argument("--list", action="store_true", help="print the shape grid and exit (no GPU needed)")
    args = p.parse_args(argv)
    args.heads, args.batch, args.context = map(parse_int_list, (args.heads, args.batch, args.context))
    return args


def shapes(args):
    for h in args.heads:
        for b in args.batch:
            for s in args.context:
                cache_gb = b * s * (D_LAT + D_PE) * 2 / 1e9
                if cache_gb <= args.max_cache_gb:
                    yield h, b, s, cache_gb


def _flashinfer_runner(q, kv, table, seq_lens, qsl, scale, page):
    """FlashInfer's BatchMLAPagedAttentionWrapper on the same cache, or None with a reason."""
    import torch
    try:
        import flashinfer
    except ImportError:
        return None, "not installed"
    try:
        dev = q.device
        b = len(seq_lens)
        n_pages = [-(-s // page) for s in seq_lens]
        kv_indptr = torch.tensor([0, *itertools.accumulate(n_pages)], dtype=torch.int32, device=dev)
        kv_indices = torch.cat([table[i, :n] for i, n in enumerate(n_pages)]).int()
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
        w = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws, backend="auto")
        w.plan(torch.tensor(qsl, dtype=torch.int32, device=dev), kv_indptr, kv_indices,
               torch.tensor(seq_lens, dtype=torch.int32, device=dev), q.shape[1], D_LAT, D_PE, page,
               q.shape[0] > b, scale, q.dtype, kv.dtype)
        ckv, kpe = kv[..., :D_LAT], kv[..., D_LAT:]
        q_nope, q_pe = q[..., :D_LAT].contiguous(), q[..., D_LAT:].contiguous()
        fn = lambda: w.run(q_nope, q_pe, ckv, kpe)  # noqa: E731
        fn()
        return fn, ""
    except Exception as e:  # version skew, JIT build failure, layout not accepted, ...
        return None, f"failed: {type(e).__name__}: {str(e)[:80]}"


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for h, b, s, gb in shapes(args):
            print(f"heads={h} batch={b} context={s} q_len={args.q_len} cache={gb:.2f} GB")
        return
    require_cuda("bench_mla_decode")
    import torch
    from kernels.mla import mla_decode_torch
    from kernels.mla_decode_triton import mla_decode_triton

    peaks = device_banner()
    dtype = getattr(torch, args.dtype)
    scale = (192 ** -0.5)
    widths = (6, 6, 7, 10, 9, 8, 8, 10, 11)
    print(row(("heads", "batch", "ctx", "triton_ms", "GB/s", "%copy", "TFLOP/s", "torch/tri", "flashinf/tri"),
              widths))
    fi_note = None
    for h, b, s, _ in shapes(args):
        torch.cuda.empty_cache()
        page = args.page
        per_seq = -(-s // page)
        kv = torch.randn(b * per_seq, page, D_LAT + D_PE, dtype=dtype, device="cuda")
        table = torch.randperm(b * per_seq, device="cuda", dtype=torch.int32).view(b, per_seq)
        seq_lens = [s] * b
        qsl = [i * args.q_len for i in range(b + 1)]
        q = torch.randn(b * args.q_len, h, D_LAT + D_PE, dtype=dtype, device="cuda")
        tri = lambda: mla_decode_triton(q, kv, table, seq_lens, qsl, scale, D_LAT)  # noqa: E731
        ms = bench_ms(tri)
        nbytes = b * s * (D_LAT + D_PE) * 2 + q.numel() * 2 + b * args.q_len * h * D_LAT * 2
        flops = 2 * b * args.q_len * h * s * (D_LAT + D_PE + D_LAT)
        gbps = nbytes / ms / 1e6
        torch_ratio = "-"
        if not args.no_torch and b * s * h <= 256 * 8192 * 16:
            ref = lambda: mla_decode_torch(q, kv, table, seq_lens, qsl, scale, D_LAT)  # noqa: E731
            err = (tri().float() - ref().float()).abs().max().item()
            if not math.isfinite(err) or err > 5e-2:
                print(f"# WARNING: triton vs torch max abs diff {err:.3g} at heads={h} batch={b} ctx={s}")
            torch_ratio = f"{bench_ms(ref, warmup=2, rep=5) / ms:.2f}"
        fi, why = _flashinfer_runner(q, kv, table, seq_lens, qsl, scale, page)
        fi_ratio = f"{bench_ms(fi) / ms:.2f}" if fi else "-"
        if fi is None and fi_note is None:
            fi_note = why
        print(row((h, b, s, f"{ms:.3f}", f"{gbps:.0f}", f"{100 * gbps / peaks['copy_gbps']:.0f}%",
                   f"{flops / ms / 1e9:.1f}", torch_ratio, fi_ratio), widths))
        kv = table = q = None   # free this shape's tensors (the lambdas above close over these names)
    if fi_note:
        print(f"# flashinfer: {fi_note}")


if __name__ == "__main__":
    sys.exit(main())
