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


def _decode_groups(block_table, seq_lens, query_start_loc, bs, dev):
    """Query tokens grouped by how many cache blocks their sequence spans (built once per step,
    shared by every layer): each group pads its keys only to its own width, not the longest
    sequence's, so neither the copy of the cache rows nor the attention math pays for padding."""
    by_width: dict[int, list[int]] = {}
    for b, n in enumerate(seq_lens):
        if query_start_loc[b + 1] > query_start_loc[b]:
            by_width.setdefault(-(-n // bs), []).append(b)
    groups = []
    for width, seqs in by_width.items():
        counts = [query_start_loc[b + 1] - query_start_loc[b] for b in seqs]
        rows = [t for b in seqs for t in range(query_start_loc[b], query_start_loc[b + 1])]
        # query row -> its sequence within the group (None: one query per sequence, no repeats)
        seq_of = None if all(c == 1 for c in counts) else torch.tensor(
            [i for i, c in enumerate(counts) for _ in range(c)], device=dev)
        # position of each query token: it sees keys 0 .. pos (causal within its sequence)
        pos = torch.tensor([seq_lens[b] - c + j for b, c in zip(seqs, counts) for j in range(c)], device=dev)
        hidden = (torch.arange(width * bs, device=dev)[None, :] > pos[:, None])[:, None, :]
        bias = torch.zeros(len(rows), 1, width * bs, device=dev).masked_fill_(hidden, float("-inf"))
        idx = block_table[seqs, :width].long().flatten()
        groups.append((torch.tensor(rows, device=dev), len(seqs), idx, seq_of, bias))
    return groups


def mla_decode_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: list[int], query_start_loc: list[int], scale: float,
                     kv_lora_rank: int, cache: dict | None = None) -> torch.Tensor:
    """q [T, H, Dl + Dr] (absorbed) -> out [T, H, Dl].

    Batched per group of sequences that span the same number of cache blocks: each query token
    attends over its sequence's block rows and masks keys past its own position."""
    T = q.shape[0]
    out = q.new_zeros(T, q.shape[1], kv_lora_rank)
    if T == 0:
        return out
    key = ("mla_decode_groups", q.device)
    groups = cache.get(key) if cache is not None else None
    if groups is None:
        groups = _decode_groups(block_table, seq_lens, query_start_loc, kv_cache.shape[1], q.device)
        if cache is not None:
            cache[key] = groups
    # fp32 math, except a bf16 query over a bf16 cache: read as is (bf16 GEMMs accumulate in fp32;
    # a cast would copy the context again), softmax in fp32
    cdt = torch.bfloat16 if q.dtype == kv_cache.dtype == torch.bfloat16 else torch.float32
    for rows, nseq, idx, seq_of, bias in groups:
        # one flat row copy per block (index_select is a plain memcpy per row; 2-D advanced
        # indexing of the 3-D cache is several times slower on CPU)
        kv = kv_cache.index_select(0, idx).view(nseq, -1, kv_cache.shape[-1]).to(cdt)   # [B, S, D]
        if seq_of is not None:
            kv = kv[seq_of]                                                             # [Tg, S, D]
        qg = q.index_select(0, rows).to(cdt)[:, None]                                   # [Tg, 1, H, D]
        # The heads share one latent key/value head (MQA), so they ride as the query length of a
        # single head: the fused kernel reads each sequence's rows once and keeps no score tensor.
        # Values are the same rows, all D columns (the latent ones kept after: a strided slice
        # as the value is slower than the extra columns).
        o = F.scaled_dot_product_attention(qg, kv[:, None], kv[:, None], attn_mask=bias.to(cdt)[:, None],
                                           scale=scale)
        out.index_copy_(0, rows, o[:, 0, :, :kv_lora_rank].to(q.dtype))
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
