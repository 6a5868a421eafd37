"""Varlen causal flash attention for MLA's expanded (prefill) path (Triton). Contract of
kernels/mla.py `prefill_attention_torch`: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] ->
[Tq, H, Dv]; sequence b owns q[cu_q[b]:cu_q[b+1]] and k/v[cu_k[b]:cu_k[b+1]], and its queries are
its last keys (chunked prefill after a cached prefix), so query i sits at position Sk - Lq + i.

Flash-attention-2 structure: one program per (query tile of BLOCK_M rows, head), online softmax
in base 2 in fp32, K/V streamed in BLOCK_N tiles, two tensor-core dots per tile. Work is
compute-bound, so:
- the qk head dim (192 = 128 nope + 64 rope for V3) is split into a power-of-two part and a
  padded remainder (128 + 64) instead of padding to 256, which would waste a quarter of QK^T;
  v's dim (128) is its own power of two. Small odd dims are padded to >= 16 with masks.
- key tiles entirely below the diagonal run without any mask; only the tiles that cross the
  diagonal pay for it (the second loop).
- query tiles are launched heaviest first (the last tiles of long sequences see the most keys),
  which shortens the tail of a causal launch; all tiles of one head are adjacent in launch order
  so that head's K/V stay in L2.
Every query sees key 0 (its position is >= 0), so the running max is finite after the first
tile and padded query rows (beyond the sequence) only ever read real keys: no NaN guards needed.
"""
import torch
import triton
import triton.language as tl

from .configs import get_config, launch_kwargs

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a [rows, cols] tile, masking only what may be out of range (compile-time choice): an
    all-true mask along the contiguous dim would cost the 16-byte vector loads."""
    if ROW_MASK and COL_MASK:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROW_MASK:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_MASK:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_tile(acc, m_i, l_i, q_a, q_b, k_rows, v_rows, n, pos, hi, qk_scale_log2,
                 da, db, dv, D_A: tl.constexpr, D_B: tl.constexpr, D_QK: tl.constexpr,
                 D_V: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                 BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    n_ok = n < hi
    k_a = _load_tile(k_rows[:, None] + da[None, :], n_ok, da < D_QK, MASKED, BLOCK_DA != D_A)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
    if D_B > 0:
        k_b = _load_tile(k_rows[:, None] + D_A + db[None, :], n_ok, db < D_B, MASKED, BLOCK_DB != D_B)
        s += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PREC)
    s = s * qk_scale_log2
    if MASKED:
        s = tl.where(n_ok[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_tile(v_rows[:, None] + dv[None, :], n_ok, dv < D_V, MASKED, BLOCK_DV != D_V)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_m0_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, qk_scale_log2,
                    D_QK: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr,
                    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    b = tl.load(tile_seq_ptr + tile)
    m0 = tl.load(tile_m0_ptr + tile)
    q_lo = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_lo
    k_lo = tl.load(cu_k_ptr + b)
    k_len = tl.load(cu_k_ptr + b + 1) - k_lo

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    pos = k_len - q_len + offs_m
    da = tl.arange(0, BLOCK_DA)
    db = tl.arange(0, BLOCK_DB)
    dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + (q_lo + offs_m).to(tl.int64) * stride_qt + head * stride_qh
    q_a = tl.load(q_rows[:, None] + da[None, :], mask=m_ok[:, None] & (da < D_QK)[None, :], other=0.0)
    if D_B > 0:
        q_b = tl.load(q_rows[:, None] + D_A + db[None, :], mask=m_ok[:, None] & (db < D_B)[None, :],
                      other=0.0)
    else:
        q_b = q_a  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # keys below every row's diagonal: n <= k_len - q_len + m0
    full_hi = ((k_len - q_len + m0 + 1) // BLOCK_N) * BLOCK_N
    # one past the last key the tile's last real row may see
    hi = k_len - q_len + tl.minimum(m0 + BLOCK_M, q_len)
    k_base = k_ptr + k_lo.to(tl.int64) * stride_kt + head * stride_kh
    v_base = v_ptr + k_lo.to(tl.int64) * stride_vt + head * stride_vh
    for start in range(0, full_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_a, q_b, k_base + n.to(tl.int64) * stride_kt,
                                     v_base + n.to(tl.int64) * stride_vt, n, pos, hi, qk_scale_log2,
                                     da, db, dv, D_A, D_B, D_QK, D_V, BLOCK_DA, BLOCK_DB, BLOCK_DV,
                                     False, DOT_PREC)
    for start in range(full_hi, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_a, q_b, k_base + n.to(tl.int64) * stride_kt,
                                     v_base + n.to(tl.int64) * stride_vt, n, pos, hi, qk_scale_log2,
                                     da, db, dv, D_A, D_B, D_QK, D_V, BLOCK_DA, BLOCK_DB, BLOCK_DV,
                                     True, DOT_PREC)
    out = acc / l_i[:, None]
    o_rows = o_ptr + (q_lo + offs_m).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_rows[:, None] + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (dv < D_V)[None, :])


def _split_dim(d: int):
    """qk dim -> (D_A, BLOCK_DA, D_B, BLOCK_DB): a power-of-two head part plus a padded tail."""
    if d <= 16:
        return d, 16, 0, 16
    d_a = 1 << (d.bit_length() - 1)  # largest power of two <= d
    rest = d - d_a
    return d_a, d_a, rest, max(16, triton.next_power_of_2(rest)) if rest else 16


def prefill_config(d_qk: int) -> dict:
    bd = triton.next_power_of_2(d_qk)
    return get_config("prefill", "d<=64" if bd <= 64 else "d<=128" if bd <= 128 else "d<=256")


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_q, cu_k, scale: float) -> torch.Tensor:
    """Varlen causal attention; cu_q / cu_k are python int lists (or int tensors) of length B + 1."""
    tq, n_heads, d_qk = q.shape
    d_v = v.shape[-1]
    assert k.shape[1] == v.shape[1] == n_heads and k.shape[-1] == d_qk
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "head dims must be contiguous"
    out = q.new_empty(tq, n_heads, d_v)
    cq = [int(x) for x in cu_q]
    ck = [int(x) for x in cu_k]
    cfg = prefill_config(d_qk)
    bm = cfg["BLOCK_M"]
    tiles = []  # (work ~ keys seen, seq, first query row)
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert lk >= lq, f"sequence {b}: {lq} queries but only {lk} keys"
        tiles += [(lk - lq + min(m0 + bm, lq), b, m0) for m0 in range(0, lq, bm)]
    if not tiles or n_heads == 0:
        return out
    tiles.sort(key=lambda x: -x[0])  # heaviest first
    dev = q.device
    tile_seq = torch.tensor([t[1] for t in tiles], dtype=torch.int32, device=dev)
    tile_m0 = torch.tensor([t[2] for t in tiles], dtype=torch.int32, device=dev)
    cu_q_t = torch.tensor(cq, dtype=torch.int32, device=dev)
    cu_k_t = torch.tensor(ck, dtype=torch.int32, device=dev)
    d_a, block_da, d_b, block_db = _split_dim(d_qk)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_kernel[(len(tiles), n_heads)](
        q, k, v, out, cu_q_t, cu_k_t, tile_seq, tile_m0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), scale * LOG2E,
        D_QK=d_qk, D_A=d_a, D_B=d_b, D_V=d_v, BLOCK_DA=block_da, BLOCK_DB=block_db,
        BLOCK_DV=max(16, triton.next_power_of_2(d_v)), BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"],
        DOT_PREC=prec, **launch_kwargs(cfg))
    return out
