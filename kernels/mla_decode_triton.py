"""Absorbed MLA decode over the paged latent cache (Triton). Contract of kernels/mla.py
`mla_decode_torch`: q [T, H, Dl + Dr] already in latent space -> out [T, H, Dl].

After absorption attention is MQA with a single 576-wide key head (512 latent + 64 rope for V3)
shared by every query head, and the values are the latent part of the same cache rows. Decode is
bound by reading the cache, so the design is about reading each cache byte exactly once and
keeping enough loads in flight:

Stage 1, grid (row tiles, KV splits, sequences). A program owns BLOCK_M "rows" = (query token,
head) pairs of one sequence -- 16 heads of one token for V3's 16-head ranks, or several tokens x
heads for multi-token queries -- and one contiguous split of the sequence's context. Each KV tile
of BLOCK_N cache rows is loaded once (pages resolved through the block table per row, so any
power-of-two page size works) and used three times: latent scores, rope scores, and as V. Both
products are tensor-core dots with fp32 accumulation; softmax is online in base 2 with the scale
folded into log2(e). Splitting the context across programs keeps every SM busy at small batch
(one 32k-token sequence still spreads over dozens of SMs).

Stage 2, grid (T, H): log-sum-exp merge of the per-split partial outputs. With a single split the
first stage writes the final output directly and the second is skipped (large batches).

Causality for multi-token queries: query j of a sequence with context S and q_len L sits at
position S - L + j and sees keys 0 .. S - L + j; a split beyond a row's last key leaves that row
empty (lse = -inf, output 0), which the merge weighs as zero.
"""
import math

import torch
import triton
import triton.language as tl

from .configs import bucket, get_config, launch_kwargs


@triton.jit
def _mla_decode_stage1(
        q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, o_ptr, lse_ptr,
        stride_qt, stride_qh, stride_kb, stride_kr, stride_bt,
        stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
        H, num_splits, qk_scale_log2,
        D_LAT: tl.constexpr, D_PE: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
        DIRECT: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    q_lo = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_lo
    rows = q_len * H
    row0 = tile * BLOCK_M
    if row0 < rows:
        S = tl.load(seq_lens_ptr + b)
        r = row0 + tl.arange(0, BLOCK_M)
        r_ok = r < rows
        j = r // H                      # query token within the sequence
        h = r % H
        pos = S - q_len + j             # causal position of each row's query
        tok = (q_lo + j).to(tl.int64)

        dl = tl.arange(0, BLOCK_DL)
        dr = tl.arange(0, BLOCK_DR)
        # masks on the head dims only where they are padded (an all-true runtime mask along the
        # contiguous dim would stop 16-byte vectorization of the cache loads)
        dl_ok = dl < D_LAT
        dr_ok = dr < D_PE
        q_rows = q_ptr + tok * stride_qt + h.to(tl.int64) * stride_qh
        q_lat = tl.load(q_rows[:, None] + dl[None, :], mask=r_ok[:, None] & dl_ok[None, :], other=0.0)
        q_pe = tl.load(q_rows[:, None] + D_LAT + dr[None, :], mask=r_ok[:, None] & dr_ok[None, :],
                       other=0.0)

        # this program's slice of the context, in whole BLOCK_N tiles, cut at the last key any of
        # its rows may see
        split_len = tl.cdiv(tl.cdiv(S, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * split_len
        last_j = (tl.minimum(row0 + BLOCK_M, rows) - 1) // H
        kv_hi = tl.minimum(kv_lo + split_len, S - q_len + last_j + 1)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DL], dtype=tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        for start in range(kv_lo, kv_hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < kv_hi
            page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            kv_rows = kv_ptr + page * stride_kb + (n % PAGE).to(tl.int64) * stride_kr
            if BLOCK_DL == D_LAT:
                k_lat = tl.load(kv_rows[:, None] + dl[None, :], mask=n_ok[:, None], other=0.0)
            else:
                k_lat = tl.load(kv_rows[:, None] + dl[None, :], mask=n_ok[:, None] & dl_ok[None, :],
                                other=0.0)
            if BLOCK_DR == D_PE:
                k_pe = tl.load(kv_rows[:, None] + D_LAT + dr[None, :], mask=n_ok[:, None], other=0.0)
            else:
                k_pe = tl.load(kv_rows[:, None] + D_LAT + dr[None, :],
                               mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
            k_lat = k_lat.to(q_lat.dtype)
            k_pe = k_pe.to(q_pe.dtype)

            s = tl.dot(q_lat, tl.trans(k_lat), input_precision=DOT_PREC)
            s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PREC)
            s = s * qk_scale_log2
            visible = n_ok[None, :] & (n[None, :] <= pos[:, None])
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # the latent part of the key tile is the value tile: no second load
            acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=DOT_PREC)
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        o_rows = o_ptr + tok * stride_ot + h.to(tl.int64) * stride_oh
        if DIRECT:
            tl.store(o_rows[:, None] + dl[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & dl_ok[None, :])
        else:
            tl.store(o_rows[:, None] + split * stride_os + dl[None, :], out,
                     mask=r_ok[:, None] & dl_ok[None, :])
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + tok * stride_lt + h.to(tl.int64) * stride_lh + split, lse, mask=r_ok)


@triton.jit
def _mla_decode_stage2(o_part_ptr, lse_ptr, out_ptr, num_splits,
                       stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                       D_LAT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    dl = tl.arange(0, BLOCK_DL)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)         # finite: split 0 always holds key 0, visible to every query
    w = tl.exp2(lse - m)
    part = tl.load(o_part_ptr + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + dl[None, :],
                   mask=s_ok[:, None] & (dl < D_LAT)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dl, out.to(out_ptr.dtype.element_ty),
             mask=dl < D_LAT)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _step_ints(cache, key, values, dev) -> torch.Tensor:
    """An int32 device copy of a per-step host list, made once per step (not once per layer)."""
    if cache is not None and key in cache and cache[key].device == dev:
        return cache[key]
    t = torch.tensor(values, dtype=torch.int32)
    t = t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t
    if cache is not None:
        cache[key] = t
    return t


def mla_decode_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens, query_start_loc, scale: float, kv_lora_rank: int,
                      *, num_kv_splits: int | None = None, cache: dict | None = None) -> torch.Tensor:
    """q [T, H, Dl + Dr] (absorbed) -> out [T, H, Dl]; seq_lens [B] / query_start_loc [B + 1] are
    python int lists (or int tensors); `num_kv_splits` overrides the split heuristic. `cache`: the
    step's dict; its int32 device copies of both lists ("seq_lens_i32", "query_start_loc_i32", put
    there once per step by the model runner, or made here on first use) serve every layer."""
    t, n_heads, d = q.shape
    d_lat, d_pe = kv_lora_rank, d - kv_lora_rank
    page = kv_cache.shape[1]
    assert kv_cache.shape[-1] == d and page & (page - 1) == 0, "cache rows of D, power-of-two pages"
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = q.new_empty(t, n_heads, d_lat)
    sl = [int(x) for x in seq_lens]
    qsl = [int(x) for x in query_start_loc]
    n_seqs = len(sl)
    if t == 0 or n_seqs == 0:
        return out
    dev = q.device
    seq_lens_t = _step_ints(cache, "seq_lens_i32", sl, dev)
    qsl_t = _step_ints(cache, "query_start_loc_i32", qsl, dev)
    max_q = max(qsl[i + 1] - qsl[i] for i in range(n_seqs))
    max_rows = max_q * n_heads
    cfg = get_config("mla_decode", bucket(max_rows, (16, 32), "rows"))
    block_m = cfg["BLOCK_M"]
    row_tiles = triton.cdiv(max_rows, block_m)

    if num_kv_splits is None:
        # enough programs to fill the machine a few times over, but no split shorter than
        # MIN_SPLIT_TOKENS (each split costs an fp32 partial row per (token, head) in stage 2)
        target = cfg["WAVES"] * _num_sms(dev) if "WAVES" in cfg else cfg["TARGET_PROGRAMS"]
        want = triton.cdiv(target, n_seqs * row_tiles)
        by_len = triton.cdiv(max(sl), cfg["MIN_SPLIT_TOKENS"])
        num_kv_splits = max(1, min(want, by_len, cfg["MAX_SPLITS"]))
    direct = num_kv_splits == 1

    if direct:
        o_part, lse = out, out  # lse unused
        strides_o = (out.stride(0), out.stride(1), 0)
        strides_l = (0, 0)
    else:
        o_part = torch.empty(t, n_heads, num_kv_splits, d_lat, dtype=torch.float32, device=dev)
        lse = torch.empty(t, n_heads, num_kv_splits, dtype=torch.float32, device=dev)
        strides_o = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
        strides_l = (lse.stride(0), lse.stride(1))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no silent tf32 on GPU
    _mla_decode_stage1[(row_tiles, num_kv_splits, n_seqs)](
        q, kv_cache, block_table, seq_lens_t, qsl_t, o_part, lse,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        *strides_o, *strides_l,
        n_heads, num_kv_splits, scale * math.log2(math.e),
        D_LAT=d_lat, D_PE=d_pe, PAGE=page, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_DL=max(16, triton.next_power_of_2(d_lat)), BLOCK_DR=max(16, triton.next_power_of_2(d_pe)),
        DIRECT=direct, DOT_PREC=prec, **launch_kwargs(cfg))
    if not direct:
        _mla_decode_stage2[(t, n_heads)](
            o_part, lse, out, num_kv_splits, *strides_o, *strides_l, out.stride(0), out.stride(1),
            D_LAT=d_lat, BLOCK_S=triton.next_power_of_2(num_kv_splits),
            BLOCK_DL=max(16, triton.next_power_of_2(d_lat)), **launch_kwargs(get_config("mla_merge")))
    return out
