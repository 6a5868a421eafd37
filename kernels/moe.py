"""Routed-expert computation (torch reference of the fused MoE kernel).

Experts are stacked: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I]. `topk_ids` holds
LOCAL expert indices; -1 marks a choice owned by another rank (expert parallelism), which is skipped.
"""
import torch
import torch.nn.functional as F


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])."""
    inter = w2.shape[-1]
    out = x.new_zeros(x.shape)
    flat = topk_ids.flatten()
    # Sort the (token, choice) rows by expert once: each expert then works on one contiguous slice
    # (fewer small ops per expert than a mask per expert, which is what bounds small batches).
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat[order] + 1, minlength=w13.shape[0] + 1).tolist()   # [skipped, e0, e1, ...]
    rows = order[counts[0]:]                     # choices held here (-1 sorts first)
    if rows.numel() == 0:
        return out
    tok = rows // topk_ids.shape[1]
    xs = x[tok]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts[1:]):
        if n:
            h = F.linear(xs[start:start + n], w13[e])
            ys[start:start + n] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])
            start += n
    ys *= topk_weights.flatten()[rows, None].to(x.dtype)
    return out.index_add_(0, tok, ys)
