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
    # one row per (token, choice): every row is written once, so no scatter-add is needed
    per_choice = x.new_zeros(topk_ids.shape[0], topk_ids.shape[1], x.shape[1])
    for e in torch.unique(topk_ids).tolist():
        if e < 0:
            continue
        tok, slot = torch.where(topk_ids == e)
        h = F.linear(x[tok], w13[e])
        h = F.silu(h[:, :inter]) * h[:, inter:]
        per_choice[tok, slot] = F.linear(h, w2[e]) * topk_weights[tok, slot, None].to(x.dtype)
    return per_choice.sum(1)
