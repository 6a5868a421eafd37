"""Fused routed-expert computation (Triton). Contract of kernels/moe.py `fused_moe_torch`, plus
FP8 w8a8 when block scales are given (w13/w2 fp8 with 128 x 128 block scales, activations
quantized per token per 1 x 128 group at run time).

  x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_ids [T, k] LOCAL expert
  ids (-1: owned by another rank, contributes nothing), topk_weights [T, k].

Pipeline (no host synchronization anywhere, so it can be captured in a CUDA graph):
1. align (a dozen small torch ops): the T*k (token, choice) pairs are sorted by expert and each
   expert's list is padded to a multiple of BLOCK_M with a sentinel, so every BLOCK_M row block
   belongs to one expert. The buffer is sized for the worst case (T*k + min(E, T*k) * (BLOCK_M - 1));
   blocks past the real end exit at once. Empty experts get no block; -1 choices are never listed.
2. gate/up grouped GEMM: per (row block, I tile) it gathers the block's token rows of x and runs
   two K loops' worth of dots in one (gate and up tiles of the same expert), then applies
   SiLU(gate) * up in fp32 in the epilogue, so the 2I-wide pre-activation never touches memory.
   In FP8 mode the epilogue also quantizes its 128-wide output tile as one activation group
   (fp8 + one scale per row), so the down GEMM reads fp8 directly with no separate quant pass.
3. down grouped GEMM: same gather over the intermediate, routing weight applied in the fp32
   epilogue, one row per (token, choice).
4. sum over the top-k choices per token (skipping -1 choices) in fp32.

Both GEMMs read the expert's weight tile as [BLOCK_K, BLOCK_N] over K-contiguous rows (K-major B,
as Hopper's fp8 wgmma requires) and accumulate in fp32; the launch order groups GROUP_M row
blocks per weight column band so the band is reused from L2.
"""
import torch
import triton
import triton.language as tl

from .configs import bucket, get_config, launch_kwargs
from .fp8_triton import FP8, FP8_MAX, block_coords, per_token_group_quant_fp8_triton, round_to_e4m3

SCALE_BLOCK = 128


# ----------------------------------------------------------------------------------------------
# 1. align: sort (token, choice) pairs by expert, pad each expert to BLOCK_M
# ----------------------------------------------------------------------------------------------
def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """-> (sorted_ids [P] int32: flat pair index t*k+j or the sentinel T*k for padding,
           expert_ids [P / block_m] int32: expert of each row block, -1 past the end,
           total [1] int32: number of padded rows actually used).  P is the worst-case size."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    e = num_experts
    max_padded = triton.cdiv(n + min(e, n) * (block_m - 1), block_m) * block_m
    key = torch.where(flat >= 0, flat, e).to(torch.int64)     # -1 sorts last, as pseudo-expert e
    # scatter_add, not bincount: bincount on CUDA reads the max back to the host (a sync)
    counts = torch.zeros(e + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:e]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)                    # pairs grouped by expert
    skey = key[order]
    valid = skey < e
    ek = skey.clamp(max=e - 1)
    rank = torch.arange(n, device=dev) - cnt_start[ek]
    dest = torch.where(valid, pad_start[ek] + rank, max_padded)  # -1 pairs go to a dropped slot
    sorted_ids = torch.full((max_padded + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, max_padded, block_m, device=dev)
    total = pad_end[-1:]
    expert_ids = torch.searchsorted(pad_end, starts, right=True)
    expert_ids = torch.where(starts < total, expert_ids, -1).to(torch.int32)
    return sorted_ids[:max_padded], expert_ids, total.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# 2. gate/up GEMM with SiLU-and-mul (and FP8 group quant) in the epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moe_gate_up_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr,
                        sorted_ids_ptr, expert_ids_ptr, total_ptr,
                        num_m, n_pairs, top_k, N, K,
                        stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn,
                        stride_hm, stride_hsm,
                        FP8_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_n = block_coords(tl.program_id(0), num_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(total_ptr):
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        r_ok = rows < n_pairs
        tok = (rows // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        a_ptrs = a_ptr + tok[:, None] * stride_am + offs_k[None, :]
        g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + N * stride_wn
        if FP8_MODE:
            as_ptrs = as_ptr + tok * stride_asm
            gs_ptrs = ws_ptr + e * stride_wse + (offs_n // SCALE_BLOCK) * stride_wsn
            us_ptrs = ws_ptr + e * stride_wse + ((offs_n + N) // SCALE_BLOCK) * stride_wsn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8_MODE:
                sb = (kk * BLOCK_K) // SCALE_BLOCK
                a_s = tl.load(as_ptrs + sb, mask=r_ok, other=0.0)
                g_s = tl.load(gs_ptrs + sb, mask=n_ok, other=0.0)
                u_s = tl.load(us_ptrs + sb, mask=n_ok, other=0.0)
                acc_g += tl.dot(a, bg) * (a_s[:, None] * g_s[None, :])
                acc_u += tl.dot(a, bu) * (a_s[:, None] * u_s[None, :])
            else:
                acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
                acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K

        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u     # SiLU(gate) * up, fp32
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        mask = r_ok[:, None] & n_ok[None, :]
        if FP8_MODE:
            # this 128-wide tile is exactly one activation group of the down GEMM's input
            # (columns past N are exact zeros: their weights loaded as 0)
            scale = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-12) / FP8_MAX
            hq = round_to_e4m3(tl.clamp(h / scale[:, None], -FP8_MAX, FP8_MAX))
            tl.store(h_ptrs, hq.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(hs_ptr + rows.to(tl.int64) * stride_hsm + pid_n, scale, mask=r_ok)
        else:
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. down GEMM with the routing weight in the epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moe_down_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, y_ptr, topk_w_ptr,
                     sorted_ids_ptr, expert_ids_ptr, total_ptr,
                     num_m, n_pairs, N, K,
                     stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                     FP8_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_n = block_coords(tl.program_id(0), num_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(total_ptr):
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        r_ok = rows < n_pairs
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :]
        b_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        if FP8_MODE:
            as_ptrs = as_ptr + rows64 * stride_asm
            bs_ptrs = ws_ptr + e * stride_wse + (offs_n // SCALE_BLOCK) * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8_MODE:
                sb = (kk * BLOCK_K) // SCALE_BLOCK
                a_s = tl.load(as_ptrs + sb, mask=r_ok, other=0.0)
                b_s = tl.load(bs_ptrs + sb, mask=n_ok, other=0.0)
                acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        w = tl.load(topk_w_ptr + rows64, mask=r_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
        tl.store(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# 4. sum over the top-k choices
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, stride_ym, stride_om,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        # rows of -1 choices were never written: mask them out, never multiply garbage by 0
        v = tl.load(y_ptr + (t * TOP_K + j) * stride_ym + offs, mask=h_ok & (e >= 0), other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def moe_config(n_pairs: int, num_experts: int, fp8: bool) -> dict:
    rows_per_expert = triton.cdiv(n_pairs, max(1, num_experts))
    cfg = get_config("moe_fp8" if fp8 else "moe_bf16", bucket(rows_per_expert, (16, 64, 256), "rows"))
    if fp8:
        # the fused activation quant needs one 128-group per output tile, one scale per K step
        cfg["BLOCK_N"] = cfg["BLOCK_K"] = SCALE_BLOCK
    return cfg


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]); -1 ids are skipped.

    `config` overrides the launch config (tests and tuning)."""
    t, hidden = x.shape
    e, two_i, k_in = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    fp8 = w13_scale is not None
    assert k_in == hidden and w2.shape == (e, hidden, inter)
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    out = torch.empty_like(x)
    n_pairs = t * top_k
    if n_pairs == 0 or e == 0:
        return out.zero_()
    x = x if x.stride(-1) == 1 else x.contiguous()
    ids = topk_ids.contiguous()
    cfg = dict(config) if config is not None else moe_config(n_pairs, e, fp8)
    bm, bn, bk, gm = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]
    sorted_ids, expert_ids, total = moe_align(ids, e, bm)
    num_m = expert_ids.numel()
    dev = x.device
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    lk = launch_kwargs(cfg)

    if fp8:
        assert w13.dtype == FP8 and w2.dtype == FP8 and bn == bk == SCALE_BLOCK
        a, a_s = per_token_group_quant_fp8_triton(x, SCALE_BLOCK)
        h = torch.empty(n_pairs, inter, dtype=FP8, device=dev)
        h_s = torch.empty(n_pairs, triton.cdiv(inter, SCALE_BLOCK), dtype=torch.float32, device=dev)
        ws13, ws2 = w13_scale, w2_scale
        scale_strides13 = (ws13.stride(0), ws13.stride(1))
        scale_strides2 = (ws2.stride(0), ws2.stride(1))
        assert ws13.stride(-1) == 1 and ws2.stride(-1) == 1
    else:
        assert w13.dtype == x.dtype == w2.dtype, "non-fp8 experts run in the activation dtype"
        a, a_s = x, x                                    # a_s unused
        h = torch.empty(n_pairs, inter, dtype=x.dtype, device=dev)
        h_s = h                                          # unused
        ws13, ws2 = w13, w2                              # unused
        scale_strides13 = scale_strides2 = (0, 0)

    _moe_gate_up_kernel[(num_m * triton.cdiv(inter, bn),)](
        a, a_s, w13, ws13, h, h_s, sorted_ids, expert_ids, total,
        num_m, n_pairs, top_k, inter, hidden,
        a.stride(0), a_s.stride(0), w13.stride(0), w13.stride(1), *scale_strides13,
        h.stride(0), h_s.stride(0),
        FP8_MODE=fp8, SCALE_BLOCK=SCALE_BLOCK, FP8_MAX=FP8_MAX,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, DOT_PREC=prec, **lk)

    y = torch.empty(n_pairs, hidden, dtype=x.dtype, device=dev)
    _moe_down_kernel[(num_m * triton.cdiv(hidden, bn),)](
        h, h_s, w2, ws2, y, topk_weights.contiguous().view(-1), sorted_ids, expert_ids, total,
        num_m, n_pairs, hidden, inter,
        h.stride(0), h_s.stride(0), w2.stride(0), w2.stride(1), *scale_strides2, y.stride(0),
        FP8_MODE=fp8, SCALE_BLOCK=SCALE_BLOCK,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, DOT_PREC=prec, **lk)

    scfg = get_config("moe_sum")
    bh = min(scfg["BLOCK_H"], triton.next_power_of_2(hidden))
    _moe_sum_kernel[(t, triton.cdiv(hidden, bh))](
        y, ids, out, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=bh,
        **launch_kwargs(scfg))
    return out
