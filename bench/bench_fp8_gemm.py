"""FP8 block-scaled GEMM microbenchmark: Triton w8a8 (1x128 activation groups, 128x128 weight
blocks) vs a bf16 cuBLAS matmul of the same shape and vs the torch reference (dequantize, matmul),
at DeepSeek-V3's dense projection shapes.

    python -m bench.bench_fp8_gemm [--m 1,16,128,1024,4096,16384] [--shapes NxK,...] [--list]

Per shape: time (activation quant included), TFLOP/s and its fraction of the measured bf16 matmul
rate, speed-up over bf16 cuBLAS on the same shape (the issue's target: >= 1.5x at large M), and
torch-reference/triton.
"""
import argparse
import sys

try:
    from bench._gpu import bench_ms, device_banner, parse_int_list, require_cuda, row
except ImportError:  # run as a file: bench/ is sys.path[0]
    from _gpu import bench_ms, device_banner, parse_int_list, require_cuda, row

# (N, K) of V3's fp8 projections: q_a, q_b, kv_a, kv_b, o, dense gate+up, dense down
V3_SHAPES = "1536x7168,24576x1536,576x7168,32768x512,7168x16384,36864x7168,7168x18432"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", default="1,16,128,1024,4096,16384", help="rows (tokens)")
    p.add_argument("--shapes", default=V3_SHAPES, help="comma-separated NxK weight shapes")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    p.add_argument("--list", action="store_true", help="print the shape grid and exit (no GPU needed)")
    args = p.parse_args(argv)
    args.m = parse_int_list(args.m)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for n, k in args.shapes:
            for m in args.m:
                print(f"M={m} N={n} K={k}")
        return
    require_cuda("bench_fp8_gemm")
    import torch
    from kernels.fp8 import fp8_block_gemm_torch, quant_block_fp8
    from kernels.fp8_triton import fp8_block_gemm_triton

    peaks = device_banner()
    widths = (6, 6, 6, 10, 9, 7, 9, 10)
    print(row(("M", "N", "K", "triton_ms", "TFLOP/s", "%bf16", "vs_bf16", "torch/tri"), widths))
    for n, k in args.shapes:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        wq, ws = quant_block_fp8(w)
        wb = w.to(torch.bfloat16)
        del w
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tri = lambda: fp8_block_gemm_triton(x, wq, ws)  # noqa: E731
            ms = bench_ms(tri)
            ms_bf16 = bench_ms(lambda: x @ wb.t())
            flops = 2 * m * n * k
            ratio = "-"
            if not args.no_torch and m * n * k <= 4096 * 36864 * 7168:
                ref = lambda: fp8_block_gemm_torch(x, wq, ws)  # noqa: E731
                out, r = tri().float(), ref().float()
                err = ((out - r).norm() / r.norm()).item()
                if err > 1e-2:
                    print(f"# WARNING: M={m} N={n} K={k}: relative L2 error vs torch {err:.3g}")
                ratio = f"{bench_ms(ref, warmup=2, rep=5) / ms:.2f}"
            tflops = flops / ms / 1e9
            print(row((m, n, k, f"{ms:.3f}", f"{tflops:.1f}", f"{100 * tflops / peaks['bf16_tflops']:.0f}%",
                       f"{ms_bf16 / ms:.2f}x", ratio), widths))


if __name__ == "__main__":
    sys.exit(main())
