"""FP8 w8a8 block quantization kernels (Triton). Same contracts as kernels/fp8.py.

- `per_token_group_quant_fp8_triton`: activations [M, K] -> fp8 [M, K] + fp32 scales
  [M, ceil(K/group)], each 1 x group slice scaled so its absmax maps to 448 (e4m3 max).
- `fp8_block_gemm_triton`: y = x @ W^T with W fp8 [N, K] in 128 x 128 scale blocks; x is quantized
  per 1 x 128 group first (one extra pass over x, which is small next to W for the dense
  projections), then each K step is one fp8 tensor-core dot (wgmma QGMMA on Hopper, twice the
  bf16 rate) whose fp32 result is scaled by (activation scale per row) x (weight scale per column
  block) and added to an fp32 accumulator. BLOCK_K divides 128, so each K step sits in one scale
  block. Partial edge blocks in N and K are masked (zeros contribute nothing).

The weight tile is addressed as [BLOCK_K, BLOCK_N] over W's K-contiguous rows, i.e. the B operand
is K-major, which is the layout Hopper's fp8 wgmma requires.
"""
import torch
import triton
import triton.language as tl

from .configs import bucket, get_config, launch_kwargs

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@triton.jit
def round_to_e4m3(v):
    """Round fp32 values with |v| <= 448 to the nearest float8_e4m3fn value (ties to even), still
    in fp32, so the following fp32->fp8 cast is exact. On a GPU this changes nothing (the hardware
    cast rounds the same way) and costs a few integer ops; under the Triton interpreter, whose
    cast misrounds values that round up to a power of two, it makes results bit-exact."""
    a = tl.abs(v)
    # e4m3 subnormals (|v| < 2^-6) have the fixed spacing 2^-9: shift them into [2^-6, 2^-5),
    # whose 3-bit-mantissa spacing is the same 2^-9, round there, shift back (exact in fp32)
    sub = a < 0.015625
    a = tl.where(sub, a + 0.015625, a)
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1                          # keep 3 of 23 mantissa bits, round to even
    r = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    r = tl.where(sub, r - 0.015625, r)
    sign = (v.to(tl.int32, bitcast=True) >> 31) << 31      # keep the sign bit (also of -0.0)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, n_groups, stride_x, stride_q, stride_s,
                        GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, FP8_MAX: tl.constexpr):
    """One program: GROUPS_PER_PROG consecutive groups of one row, as a [groups, GROUP] tile."""
    row = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    col = gi[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (gi[:, None] < n_groups) & (col < K)
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, 1e-12) / FP8_MAX
    q = round_to_e4m3(tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX))
    tl.store(q_ptr + row * stride_q + col, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + gi, scale, mask=gi < n_groups)


def per_token_group_quant_fp8_triton(x: torch.Tensor, group: int = 128):
    """Activations [M, K] -> (fp8 [M, K], fp32 scales [M, ceil(K/group)])."""
    assert x.dim() == 2 and group & (group - 1) == 0, "2-D input, power-of-two group"
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    kb = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    cfg = get_config("fp8_quant")
    gpp = min(cfg["GROUPS_PER_PROG"], triton.next_power_of_2(kb))
    _group_quant_kernel[(m, triton.cdiv(kb, gpp))](
        x, q, s, k, kb, x.stride(0), q.stride(0), s.stride(0),
        GROUP=group, GROUPS_PER_PROG=gpp, FP8_MAX=FP8_MAX, **launch_kwargs(cfg))
    return q, s


@triton.jit
def block_coords(pid, num_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles sweep the column tiles together, so a band of the
    weight matrix stays in L2 while several row tiles reuse it."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                           SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = block_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), N, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // SCALE_BLOCK) * stride_bsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kk * BLOCK_K
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        sb = k0 // SCALE_BLOCK
        a_s = tl.load(as_ptrs + sb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + sb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_block_gemm_triton(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor,
                          block: int = 128, out_dtype: torch.dtype | None = None,
                          x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """w8a8: y = dequant(quant(x)) @ dequant(w).T; x [..., K], w fp8 [N, K], scales [N/128, K/128].

    With `x_scale`, x is already fp8 with per-group scales [M, ceil(K/128)] (skips the quant pass).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0]
    assert w.shape[1] == k and w.dtype == FP8 and w.stride(-1) == 1
    out_dtype = out_dtype or (torch.bfloat16 if x.dtype == FP8 else x.dtype)
    x2 = x.reshape(-1, k)
    if x_scale is None:
        xq, xs = per_token_group_quant_fp8_triton(x2, block)
    else:
        xq, xs = (x2 if x2.stride(-1) == 1 else x2.contiguous()), x_scale
    m = xq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m and n:
        cfg = get_config("fp8_gemm", bucket(m, (16, 64, 256), "m"))
        assert block % cfg["BLOCK_K"] == 0, "a K step must stay inside one scale block"
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_block_gemm_kernel[grid](
            xq, xs, w, w_scale_inv, y, m, n, k,
            xq.stride(0), xs.stride(0), w.stride(0), w_scale_inv.stride(0), y.stride(0),
            SCALE_BLOCK=block, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            GROUP_M=cfg["GROUP_M"], **launch_kwargs(cfg))
    return y.view(*lead, n)
