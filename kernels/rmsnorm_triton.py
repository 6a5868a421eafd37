"""RMSNorm with a fused residual add (Triton). Same contract as kernels/rmsnorm.py.

Memory-bound: one program per row reads x (and the residual) once and writes y (and the new
residual) once; the row (7168 values for V3) lives in registers between the two passes, so there
is no second read. Statistics in fp32. The sum x + residual is rounded to the input dtype before
the statistics, and the normalized value is rounded to the input dtype before the weight multiply,
exactly as the torch reference does.
"""
import torch
import triton
import triton.language as tl

from .configs import get_config, launch_kwargs


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr,
                    N, stride_x, stride_r, stride_y, stride_ro, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # round the sum to the activation dtype: it is what the next layer sees as its residual
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    """y = weight * rmsnorm(x [+ residual]); returns y, or (y, x + residual) with a residual."""
    n = x.shape[-1]
    x2 = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # `weight * y` in the reference
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        r_out = torch.empty_like(x2)
    else:
        r2 = r_out = x2  # unused: HAS_RESIDUAL is a constexpr, the loads are compiled out
    if x2.shape[0] > 0:
        cfg = get_config("rmsnorm")
        block = triton.next_power_of_2(n)
        # short rows get fewer warps: at least ~8 values per thread, 16 B vector accesses
        warps = max(1, min(cfg["num_warps"], block // 256))
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, y, r_out, n, x2.stride(0), r2.stride(0), y.stride(0), r_out.stride(0),
            eps, HAS_RESIDUAL=residual is not None, BLOCK_N=block,
            **{**launch_kwargs(cfg), "num_warps": warps})
    y = y.view(x.shape)
    return y if residual is None else (y, r_out.view(x.shape))
