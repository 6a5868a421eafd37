"""Scatter of new tokens' (latent, rope key) rows into the paged latent cache (Triton).

Same contract as kernels/mla.py `write_kv_torch`: flat slot s = block * block_size + offset gets
cat(latent, k_pe) cast to the cache dtype. One program per token: two contiguous row copies
(512 + 64 values for V3), so the loads and stores are fully coalesced and the concat never
materializes. A negative slot marks a padded token (e.g. CUDA-graph padding) and is skipped; the
torch reference would write it to the last slot instead.

Optionally the rope is fused in (`cos_sin` [max_pos, rope_dim] fp32 = cos of the rope_dim/2
frequencies then their sin, attention factor folded in, plus `positions` [T]): k_pe is then the
un-rotated key and the rotated, de-interleaved pairs are written, exactly as model.deepseek.Rotary
produces them (`interleave` selects DeepSeek's (2i, 2i+1) pairing vs halves).
"""
import torch
import triton
import triton.language as tl

from .configs import get_config, launch_kwargs


@triton.jit
def _write_kv_kernel(cache_ptr, lat_ptr, pe_ptr, slot_ptr, pos_ptr, cs_ptr,
                     stride_slot, stride_lat, stride_pe, stride_cs, D_LAT, D_PE,
                     ROPE: tl.constexpr, INTERLEAVE: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = cache_ptr + slot * stride_slot
        ol = tl.arange(0, BLOCK_L)
        lat = tl.load(lat_ptr + t * stride_lat + ol, mask=ol < D_LAT)
        tl.store(dst + ol, lat.to(cache_ptr.dtype.element_ty), mask=ol < D_LAT)
        if ROPE:
            half = D_PE // 2
            i = tl.arange(0, BLOCK_R)
            m = i < half
            if INTERLEAVE:
                x1 = tl.load(pe_ptr + t * stride_pe + 2 * i, mask=m, other=0.0).to(tl.float32)
                x2 = tl.load(pe_ptr + t * stride_pe + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
            else:
                x1 = tl.load(pe_ptr + t * stride_pe + i, mask=m, other=0.0).to(tl.float32)
                x2 = tl.load(pe_ptr + t * stride_pe + half + i, mask=m, other=0.0).to(tl.float32)
            pos = tl.load(pos_ptr + t).to(tl.int64)
            c = tl.load(cs_ptr + pos * stride_cs + i, mask=m, other=0.0)
            s = tl.load(cs_ptr + pos * stride_cs + half + i, mask=m, other=0.0)
            tl.store(dst + D_LAT + i, (x1 * c - x2 * s).to(cache_ptr.dtype.element_ty), mask=m)
            tl.store(dst + D_LAT + half + i, (x2 * c + x1 * s).to(cache_ptr.dtype.element_ty), mask=m)
        else:
            orr = tl.arange(0, BLOCK_R)
            pe = tl.load(pe_ptr + t * stride_pe + orr, mask=orr < D_PE)
            tl.store(dst + D_LAT + orr, pe.to(cache_ptr.dtype.element_ty), mask=orr < D_PE)


def write_kv_triton(kv_cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                    slot_mapping: torch.Tensor, *, positions: torch.Tensor | None = None,
                    cos_sin: torch.Tensor | None = None, interleave: bool = True) -> None:
    """kv_cache [num_blocks, block_size, D_lat + D_pe] <- rows of latent [T, D_lat], k_pe [T, D_pe]."""
    d = kv_cache.shape[-1]
    t = latent.shape[0]
    latent = latent.reshape(t, -1)
    k_pe = k_pe.reshape(t, -1)
    d_lat, d_pe = latent.shape[1], k_pe.shape[1]
    assert d_lat + d_pe == d, (d_lat, d_pe, d)
    assert kv_cache.stride(-1) == 1 and kv_cache.stride(-2) == d \
        and kv_cache.stride(0) == kv_cache.shape[1] * d, "the cache must be flat-addressable by slot"
    assert latent.stride(-1) == 1 and k_pe.stride(-1) == 1, "rows must be contiguous"
    if t == 0:
        return
    rope = cos_sin is not None
    if rope:
        assert positions is not None and d_pe % 2 == 0
        cos_sin = cos_sin.float().contiguous()
    pos = positions if rope else slot_mapping
    cs = cos_sin if rope else latent
    cfg = get_config("kv_write")
    _write_kv_kernel[(t,)](
        kv_cache, latent, k_pe, slot_mapping, pos, cs,
        d, latent.stride(0), k_pe.stride(0), cs.stride(0), d_lat, d_pe,
        ROPE=rope, INTERLEAVE=interleave,
        BLOCK_L=triton.next_power_of_2(d_lat),
        BLOCK_R=triton.next_power_of_2(d_pe // 2 if rope else d_pe), **launch_kwargs(cfg))
