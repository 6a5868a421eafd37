"""MLA kernels (Triton) vs kernels/mla.py references: KV write into the paged latent cache and
absorbed decode (split-KV, grouped heads, multi-token causal queries), under the interpreter."""
import math

import pytest
import torch

from devices import KERNEL_DTYPES, TOL, torch_threads
from kernels import cpu_native
from kernels.mla import mla_decode_torch, write_kv_torch
from kernels.kv_write_triton import write_kv_triton
from kernels.mla_decode_triton import mla_decode_triton


def _paged_cache(seq_lens, page, d, dtype, seed, extra_blocks=3):
    """A cache whose sequences occupy shuffled, non-contiguous pages, with a block table whose
    entries past each sequence's end point at a poison block (large values: reading it anywhere
    unmasked would wreck the output)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // page) for s in seq_lens]
    n_blocks = sum(need) + extra_blocks
    cache = torch.randn(n_blocks, page, d, generator=g).to(dtype)
    perm = torch.randperm(n_blocks, generator=g)
    poison = int(perm[-1])
    cache[poison] = 1e3
    width = max(need) + 1
    table = torch.full((len(seq_lens), width), poison, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(need):
        table[b, :nb] = perm[used: used + nb].to(torch.int32)
        used += nb
    return cache, table


def _case(seq_lens, q_lens, heads, d_lat, d_pe, page, dtype, seed=0):
    cache, table = _paged_cache(seq_lens, page, d_lat + d_pe, dtype, seed)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(qsl[-1], heads, d_lat + d_pe, generator=g).to(dtype)
    scale = 1.5 / math.sqrt(d_lat + d_pe)  # sharper than default: causal masks must matter
    return q, cache, table, qsl, scale




@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_single_token_queries(dtype, splits):
    # lengths: a single token, not multiples of the page (16) or tile (32), one exact multiple
    seq_lens = [1, 37, 100, 64]
    q, cache, table, qsl, scale = _case(seq_lens, [1, 1, 1, 1], 16, 64, 16, 16, dtype)
    ref = mla_decode_torch(q, cache, table, seq_lens, qsl, scale, 64)
    out = mla_decode_triton(q, cache, table, seq_lens, qsl, scale, 64, num_kv_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("page", [8, 64])  # pages smaller and larger than the 32-row KV tile
def test_decode_multi_token_causal(splits, page):
    # q_len > 1: speculative / chunked prefill. The 3-token query of a 3-token sequence sees only
    # its own prefix; row tiles (32 rows = 2 tokens x 16 heads) straddle several query tokens.
    seq_lens = [45, 3, 70, 9]
    q_lens = [4, 3, 1, 5]
    q, cache, table, qsl, scale = _case(seq_lens, q_lens, 16, 64, 16, page, torch.float32, seed=3)
    ref = mla_decode_torch(q, cache, table, seq_lens, qsl, scale, 64)
    out = mla_decode_triton(q, cache, table, seq_lens, qsl, scale, 64, num_kv_splits=splits)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # causality is real: the last query token of sequence 0 differs from its first
    assert not torch.allclose(out[0], out[3])


def test_decode_v3_dims_few_heads_and_empty_query_rows():
    # V3 latent dims (512 + 64), 4 heads (rows tile padded), page 64, a sequence with no query
    seq_lens = [130, 5, 66]
    q_lens = [1, 0, 2]
    q, cache, table, qsl, scale = _case(seq_lens, q_lens, 4, 512, 64, 64, torch.float16, seed=5)
    ref = mla_decode_torch(q, cache, table, seq_lens, qsl, scale, 512)
    out = mla_decode_triton(q, cache, table, seq_lens, qsl, scale, 512)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


def test_decode_odd_head_dims_and_fp16_cache_fp32_query():
    # non power-of-two latent (40) and rope (8 + pad) dims; cache stored in a narrower dtype
    seq_lens = [33, 17]
    q, cache, table, qsl, scale = _case(seq_lens, [1, 2], 3, 40, 12, 16, torch.float32, seed=7)
    cache = cache.half()
    ref = mla_decode_torch(q, cache, table, seq_lens, qsl, scale, 40)
    out = mla_decode_triton(q, cache, table, seq_lens, qsl, scale, 40, num_kv_splits=2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_write_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(4, 16, 72, generator=g).to(dtype)
    cache_ref = cache.clone()
    latent = torch.randn(5, 64, generator=g)
    k_pe = torch.randn(5, 8, generator=g)
    slots = torch.tensor([0, 17, 63, 5, 40])
    write_kv_torch(cache_ref, latent, k_pe, slots)
    write_kv_triton(cache, latent, k_pe, slots)  # fp32 rows cast into the cache dtype
    assert torch.equal(cache, cache_ref)


def test_write_kv_skips_padded_slots_and_handles_3d_kpe():
    cache = torch.zeros(2, 8, 20)
    latent = torch.randn(3, 16)
    k_pe = torch.randn(3, 1, 4)  # [T, 1, rope] as a projection split may deliver it
    write_kv_triton(cache, latent, k_pe, torch.tensor([3, -1, 9]))
    ref = torch.zeros(2, 8, 20)
    write_kv_torch(ref, latent[[0, 2]], k_pe[[0, 2], 0], torch.tensor([3, 9]))
    assert torch.equal(cache, ref)


@pytest.mark.parametrize("interleave", [True, False])
def test_write_kv_fused_rope(interleave):
    g = torch.Generator().manual_seed(1)
    d_pe, max_pos = 16, 50
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_pe, 2).float() / d_pe))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * 0.9  # attention factor folded in
    latent = torch.randn(4, 32, generator=g)
    k_pe = torch.randn(4, d_pe, generator=g)
    pos = torch.tensor([0, 7, 49, 3])
    slots = torch.tensor([1, 2, 30, 31])
    # reference: model.deepseek.Rotary's de-interleaved output, then the plain scatter
    c, s = cos_sin[pos, : d_pe // 2], cos_sin[pos, d_pe // 2:]
    x1, x2 = (k_pe[:, 0::2], k_pe[:, 1::2]) if interleave else k_pe.chunk(2, dim=-1)
    roped = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    ref = torch.zeros(2, 16, 48)
    write_kv_torch(ref, latent, roped, slots)
    cache = torch.zeros(2, 16, 48)
    write_kv_triton(cache, latent, k_pe, slots, positions=pos, cos_sin=cos_sin, interleave=interleave)
    torch.testing.assert_close(cache, ref, atol=1e-6, rtol=1e-6)


def _naive_decode(q, cache, table, seq_lens, qsl, scale, d_lat):
    """One sequence, one query token at a time: gather its rows, attend causally, no batching."""
    from kernels.mla import gather_kv_torch
    out = torch.zeros(q.shape[0], q.shape[1], d_lat)
    for b, n in enumerate(seq_lens):
        kv = gather_kv_torch(cache, table[b], n).float()
        for j, t in enumerate(range(qsl[b], qsl[b + 1])):
            visible = kv[: n - (qsl[b + 1] - qsl[b]) + j + 1]
            p = (q[t].float() @ visible.T * scale).softmax(-1)
            out[t] = p @ visible[:, :d_lat]
    return out


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1, 1], [2, 0, 1, 3, 1]])
def test_torch_decode_reference_matches_naive_per_sequence(q_lens, layout, threads, path, monkeypatch):
    # sequences spanning 1, 2 and 3 pages, poisoned pages past every sequence's end, one sequence
    # with no query; pages shuffled (copied) or each sequence's in order (read in place, except
    # sequence 3 whose last page is elsewhere: both kinds in one step); one thread or two; the C
    # kernel (one call per query token) or torch's fused attention
    calls = []
    if path == "torch":
        monkeypatch.setattr(cpu_native, "_lib", False)
    else:
        real = cpu_native.mla_decode
        monkeypatch.setattr(cpu_native, "mla_decode", lambda *a: calls.extend(a[5].tolist()) or real(*a))
    seq_lens = [5, 40, 16, 33, 17]
    q, cache, table, qsl, scale = _case(seq_lens, q_lens, 4, 24, 8, 16, torch.float32, seed=11)
    if layout == "consecutive":
        need = [-(-n // 16) for n in seq_lens]
        cache = torch.randn(sum(need) + 2, 16, 32, generator=torch.Generator().manual_seed(12))
        cache[-1] = 1e3                                  # the poison page, past every end
        table.fill_(cache.shape[0] - 1)
        starts = [sum(need[:b]) for b in range(len(need))]
        for b, nb in enumerate(need):
            table[b, :nb] = torch.arange(starts[b], starts[b] + nb, dtype=torch.int32)
        table[3, 2] = cache.shape[0] - 2                 # sequence 3's last page is elsewhere
    cached: dict = {}
    with torch_threads(threads):
        out = mla_decode_torch(q, cache, table, seq_lens, qsl, scale, 24, cached)
        torch.testing.assert_close(out, _naive_decode(q, cache, table, seq_lens, qsl, scale, 24))
        # the per-step plan is reused by the next layer (same step, another cache)
        cache2 = torch.randn_like(cache)
        out2 = mla_decode_torch(q, cache2, table, seq_lens, qsl, scale, 24, cached)
        torch.testing.assert_close(out2, _naive_decode(q, cache2, table, seq_lens, qsl, scale, 24))
    # the C kernel: each query token over exactly the rows it may see, in one call per layer (two);
    # it reads every page in place
    seen = [n - q_lens[b] + j + 1 for b, n in enumerate(seq_lens) for j in range(q_lens[b])]
    assert sorted(calls) == (sorted(seen * 2) if path == "c" else [])
    if path == "torch":   # a one-page sequence is read in place whatever the layout
        in_place = [isinstance(where, int) for _, _, _, where, _ in cached[("mla_decode_plan", q.device)]]
        queried = [b for b, n in enumerate(q_lens) if n]
        assert in_place == [layout == "consecutive" and b != 3 or seq_lens[b] <= 16 for b in queried]


def test_torch_decode_reference_bf16_multi_token_queries():
    """A bf16 query over a bf16 cache stays in bf16 (no copy of the context), multi-token queries
    (the causal mask) included: against the fp32 oracle at bf16 tolerance."""
    seq_lens, q_lens = [5, 40, 33], [2, 3, 1]
    q, cache, table, qsl, scale = _case(seq_lens, q_lens, 4, 24, 8, 16, torch.float32, seed=13)
    q16, cache16 = q.to(torch.bfloat16), cache.to(torch.bfloat16)
    out = mla_decode_torch(q16, cache16, table, seq_lens, qsl, scale, 24)
    ref = _naive_decode(q16.float(), cache16.float(), table, seq_lens, qsl, scale, 24)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])
