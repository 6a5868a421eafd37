"""Shared helpers of the kernel microbenchmarks (bench_mla_decode, bench_fused_moe, bench_fp8_gemm).

Every figure is measured on the device at hand, never assumed: the copy bandwidth and the bf16
matmul rate measured here are the "peak" that kernel figures are divided by.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/bench_x.py` as well as `python -m bench.bench_x`
    sys.path.insert(0, ROOT)


def require_cuda(script: str) -> None:
    """Exit with a clear message where there is no CUDA device (the CPU CI never runs these)."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device present. This is a GPU microbenchmark; run it on a "
                 f"Hopper GPU (H100/H200). `--list` prints the shape grid without a GPU.")


def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of fn() with L2 flushed between calls (triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def measure_copy_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=5, rep=30)
    return 2 * nbytes / ms / 1e6


def measure_bf16_tflops(n: int = 8192) -> float:
    """Dense bf16 matmul rate (cuBLAS) on random data, TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, warmup=5, rep=30)
    return 2 * n ** 3 / ms / 1e9


def device_banner() -> dict:
    """Name, SM count and measured peaks of the current device; printed once per script."""
    props = torch.cuda.get_device_properties(0)
    peaks = dict(name=props.name, sms=props.multi_processor_count,
                 copy_gbps=measure_copy_gbps(), bf16_tflops=measure_bf16_tflops())
    print(f"# device: {peaks['name']} ({peaks['sms']} SMs); measured copy {peaks['copy_gbps']:.0f} GB/s "
          f"(read+write), bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s; torch {torch.__version__}")
    try:
        import triton
        print(f"# triton {triton.__version__}")
    except ImportError:
        pass
    return peaks


def parse_int_list(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        out.append(int(part.rstrip("k")) * mult)
    return out


def row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
