"""RMSNorm (fused residual add) Triton kernel vs the torch reference, under the interpreter."""
import pytest
import torch

from devices import KERNEL_DTYPES, TOL
from kernels.rmsnorm import rmsnorm_torch
from kernels.rmsnorm_triton import rmsnorm_triton


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n", [64, 7168, 100])  # power of two, V3 hidden, odd (masked tail)
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_matches_reference(dtype, n, residual):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    r = torch.randn(5, n, generator=g).to(dtype) if residual else None
    ref = rmsnorm_torch(x, w, 1e-6, r)
    out = rmsnorm_triton(x, w, 1e-6, r)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    if residual:
        assert out[1].dtype == dtype
        torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)  # same rounding of the sum
        torch.testing.assert_close(out[0], ref[0], **tol)
    else:
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, **tol)


def test_rmsnorm_3d_noncontiguous_and_fp32_weight():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 96, generator=g, dtype=torch.float16)
    x = base[:, :, :80]  # strided rows, contiguous last dim
    w = torch.randn(80, generator=g)  # fp32 weight promotes the output, as in the reference
    ref = rmsnorm_torch(x, w, 1e-5)
    out = rmsnorm_triton(x, w, 1e-5)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rmsnorm_single_token_and_empty():
    x = torch.randn(1, 32)
    w = torch.ones(32)
    torch.testing.assert_close(rmsnorm_triton(x, w, 1e-6), rmsnorm_torch(x, w, 1e-6))
    assert rmsnorm_triton(torch.empty(0, 32), w, 1e-6).shape == (0, 32)
