"""Attention for Multi-head Latent Attention (torch references).

Two math paths over the same paged latent cache [num_blocks, block_size, kv_lora_rank + rope_dim]:
- `mla_decode_torch`: the absorbed path. Queries are already in latent space (W_UK folded in), so
  attention is MQA with a single (latent + rope)-wide key head shared by all query heads; values are
  the latent part of the same rows; the output stays in latent space (W_UV applied by the caller).
- `prefill_attention_torch`: the expanded path. Per-head K/V after `kv_b_proj`, varlen, causal.
Multi-token queries are causal: query j of a sequence with context length S and q_len L sits at
position S - L + j and sees keys 0 .. S - L + j.
"""
import torch
import torch.nn.functional as F

from . import cpu_native, cpu_threads


def write_kv_torch(kv_cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter (latent, roped k_pe) rows of new tokens into the flat slots of the paged cache."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping] = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype)


def gather_kv_torch(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence, in order: [length, D]."""
    bs = kv_cache.shape[1]
    nblocks = -(-length // bs)
    return kv_cache[block_table_row[:nblocks].long()].reshape(-1, kv_cache.shape[-1])[:length]


def _causal_attend(q, k, v, scale):
    """q [L, H, Dq], k [S, H or 1, Dq], v [S, H or 1, Dv] -> [L, H, Dv]; queries are the last L."""
    L, S = q.shape[0], k.shape[0]
    scores = torch.einsum("lhd,shd->hls", q.float(), k.float().expand(S, q.shape[1], -1)) * scale
    pos = torch.arange(S - L, S, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] > pos[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("hls,shd->lhd", p, v.float().expand(S, q.shape[1], -1)).to(q.dtype)


def _decode_plan(block_table, seq_lens, query_start_loc, bs, dev):
    """Where each sequence's cache rows are (built once per step, shared by every layer): its query
    rows, its context length, and either the first flat row of its blocks when they are consecutive
    (the usual case: a prompt's blocks are taken in one go from an ordered free list), read in place,
    or its block ids, copied. Multi-token queries get a causal mask."""
    tables = block_table.tolist()
    plan = []
    for b, n in enumerate(seq_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        if q1 == q0:
            continue
        blocks = tables[b][:-(-n // bs)]
        consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        where = blocks[0] * bs if consecutive else torch.tensor(blocks, device=dev)
        mask = None   # boolean (True: may attend), so it suits any query dtype
        if q1 - q0 > 1:   # query j sits at position n - c + j and sees keys 0 .. that position
            c = q1 - q0
            seen = torch.arange(n, device=dev)[None, :] <= torch.arange(n - c, n, device=dev)[:, None]
            mask = seen[:, None, None]                                                 # [c, 1, 1, S]
        plan.append((q0, q1, n, where, mask))
    return plan


def _per_step(cache: dict | None, key, build):
    """`build()`, kept in the step's `cache` (shared by every layer) under `key` when there is one."""
    value = cache.get(key) if cache is not None else None
    if value is None:
        value = build()
        if cache is not None:
            cache[key] = value
    return value


def _decode_tokens(block_table, seq_lens, query_start_loc):
    """The C kernel's work list (built once per step, shared by every layer): the block table as
    int32, and per query token its row, its sequence and how many cache rows it sees."""
    tok, seq, rows = [], [], []
    for b, n in enumerate(seq_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        tok += range(q0, q1)
        seq += [b] * (q1 - q0)
        rows += range(n - (q1 - q0) + 1, n + 1)
    tok, seq, rows = (torch.tensor(v, dtype=torch.int32) for v in (tok, seq, rows))
    return block_table.to(torch.int32).contiguous(), tok, seq, rows


def mla_decode_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: list[int], query_start_loc: list[int], scale: float,
                     kv_lora_rank: int, cache: dict | None = None) -> torch.Tensor:
    """q [T, H, Dl + Dr] (absorbed) -> out [T, H, Dl].

    One sequence at a time over exactly its own cache rows: no padding to a longer sequence, and no
    copy where its blocks are consecutive (a view of the flat cache). In fp32 on the CPU, the C
    kernel (1.2-3.5x torch's fused attention for these 8-row queries); otherwise torch's."""
    T, D = q.shape[0], kv_cache.shape[-1]
    out = q.new_empty(T, q.shape[1], kv_lora_rank)
    if T == 0:
        return out
    flat = kv_cache.view(-1, D)
    # fp32 math, except a bf16 query over a bf16 cache: read as is (bf16 GEMMs accumulate in fp32;
    # a cast would copy the context again), softmax in fp32
    cdt = torch.bfloat16 if q.dtype == kv_cache.dtype == torch.bfloat16 else torch.float32

    if cdt == torch.float32 and cpu_native.usable(q, kv_cache):
        # the C kernel: every query token over exactly the rows it may see, pages read in place
        tokens = _per_step(cache, ("mla_decode_tokens", q.device),
                           lambda: _decode_tokens(block_table, seq_lens, query_start_loc))
        cpu_native.mla_decode(q, kv_cache, *tokens, kv_lora_rank, scale, out)
        return out

    page = kv_cache.shape[1]
    plan = _per_step(cache, ("mla_decode_plan", q.device),
                     lambda: _decode_plan(block_table, seq_lens, query_start_loc, page, q.device))

    def sequences(lo, hi):
        for q0, q1, n, where, mask in plan[lo:hi]:
            if isinstance(where, int):
                kv = flat[where:where + n]
            else:   # one flat row copy per block (index_select is a plain memcpy per row)
                kv = kv_cache.index_select(0, where).view(-1, D)[:n]
            kv = kv.to(cdt)[None, None]                                              # [1, 1, S, D]
            qb = q[q0:q1].to(cdt)[:, None]                                           # [c, 1, H, D]
            if mask is not None:
                kv = kv.expand(q1 - q0, -1, -1, -1)
            # The heads share one latent key/value head (MQA), so they ride as the query length of
            # a single head: the fused kernel reads the rows once and keeps no score tensor. Values
            # are the same rows, all D columns (the latent ones kept after: a strided slice is slower).
            o = F.scaled_dot_product_attention(qb, kv, kv, attn_mask=mask, scale=scale)
            out[q0:q1] = o[:, 0, :, :kv_lora_rank]
    # one call per sequence is too small for intra-op threads: each thread takes its own sequences
    cpu_threads.parallel_for(sequences, len(plan), q.device)
    return out


def prefill_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_q: list[int], cu_k: list[int], scale: float) -> torch.Tensor:
    """Varlen causal attention. q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> [Tq, H, Dv];
    sequence b owns q[cu_q[b]:cu_q[b+1]] and k/v[cu_k[b]:cu_k[b+1]] (its queries are its last keys)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for b in range(len(cu_q) - 1):
        qs = slice(cu_q[b], cu_q[b + 1])
        ks = slice(cu_k[b], cu_k[b + 1])
        L, S = qs.stop - qs.start, ks.stop - ks.start
        if L == 0:
            continue
        if q.dtype == torch.float16:   # keep the fp32 einsum path for fp16 (CPU fp16 SDPA is slow)
            out[qs] = _causal_attend(q[qs], k[ks], v[ks], scale)
            continue
        # fused kernel: no [H, L, S] score tensor, no expanded copies
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q[qs], k[ks], v[ks]))
        if L == S:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:   # queries are the last L keys' positions
            mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[qs] = o[0].transpose(0, 1)
    return out
