"""FP8 per-group activation quant and block-scaled GEMM (Triton) vs kernels/fp8.py references.

The interpreter's own fp32->fp8 cast misrounds values that round up to a power of two
(FACTS.md); the kernels round to the e4m3 grid in fp32 first (`round_to_e4m3`), after which the
cast is exact, so the quantizer is compared bit for bit with torch's cast, and the GEMM at fp32
summation-order tolerance.
"""
import pytest
import torch
import triton
import triton.language as tl

from devices import DEVICE, KERNEL_DTYPES, TOL
from kernels.fp8 import (FP8, dequant_block_fp8, fp8_block_gemm_torch, per_token_group_quant_fp8_torch,
                         quant_block_fp8)
from kernels.fp8_triton import fp8_block_gemm_triton, per_token_group_quant_fp8_triton, round_to_e4m3


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, round_to_e4m3(tl.load(x_ptr + o, mask=o < n)), mask=o < n)


def test_round_to_e4m3_is_torch_cast():
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2                       # ties: must go to even
    g = torch.Generator().manual_seed(0)
    v = torch.cat([grid, mids, torch.rand(20000, generator=g) * 896 - 448,
                   (torch.rand(5000, generator=g) - 0.5) * 0.04, torch.tensor([-0.0, 0.0])])
    v = v.to(DEVICE)
    y = torch.full_like(v, float("nan"))
    _round_kernel[(triton.cdiv(v.numel(), 8192),)](v, y, v.numel(), BLOCK=8192)
    y, v = y.cpu(), v.cpu()
    assert torch.equal(y.to(FP8).view(torch.uint8), v.to(FP8).view(torch.uint8))
    assert torch.equal(y, v.to(FP8).float())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,k", [(1, 128), (5, 300), (3, 2048 + 64)])  # partial last group
def test_group_quant_matches_reference(dtype, m, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(dtype)
    q_ref, s_ref = per_token_group_quant_fp8_torch(x)
    q, s = per_token_group_quant_fp8_triton(x)
    assert q.dtype == FP8 and s.shape == s_ref.shape == (m, -(-k // 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: min(n, 128), : min(k, 128)] *= 20  # blocks of very different scale
    return quant_block_fp8(w)


@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (33, 200, 300), (70, 64, 256)])
def test_block_gemm_on_prequantized_activations(m, n, k):
    w, ws = _weights(n, k, m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    xq, xs = per_token_group_quant_fp8_torch(x)
    y = fp8_block_gemm_triton(xq, w, ws, x_scale=xs, out_dtype=torch.float32)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, :k]
    ref = xd @ dequant_block_fp8(w, ws).t()
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_block_gemm_end_to_end_partial_blocks(dtype):
    m, n, k = 17, 200, 300  # partial blocks in N (200 = 128 + 72) and K (300 = 2*128 + 44)
    w, ws = _weights(n, k, 7)
    x = torch.randn(2, 1, m, k, generator=torch.Generator().manual_seed(2)).to(dtype)[0]  # 3-D input
    y = fp8_block_gemm_triton(x, w, ws)
    assert y.shape == (1, m, n) and y.dtype == dtype
    ref = fp8_block_gemm_torch(x[0], w, ws, out_dtype=torch.float32).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y[0], ref, **tol)
    # sanity: w8a8 stays close to the unquantized-activation product
    exact = x[0].float() @ dequant_block_fp8(w, ws).t()
    assert (y[0].float() - exact).abs().max() / exact.abs().max() < 0.05


def test_block_gemm_empty_rows():
    w, ws = _weights(64, 128, 0)
    assert fp8_block_gemm_triton(torch.empty(0, 128), w, ws).shape == (0, 64)
