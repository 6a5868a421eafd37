"""MoE routers of DeepSeek-V3 (sigmoid, bias, group-limited) and V2 (softmax) -- torch reference.

Both take fp32 router logits [T, E] and return (weights fp32 [T, k], expert ids int64 [T, k]).
"""
import torch


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, group_score) -> torch.Tensor:
    """Boolean [T, E]: True for experts inside the `topk_group` best groups."""
    t, e = scores.shape
    grouped = scores.view(t, n_group, e // n_group)
    groups = torch.topk(group_score(grouped), k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros(t, n_group, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, groups, True)
    return mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def route_v3_torch(logits: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int,
                   topk_group: int, norm_topk_prob: bool, scaling: float):
    """V3: the bias steers selection only; weights come from the unbiased sigmoid scores."""
    scores = logits.sigmoid()
    choice = scores + bias
    if n_group > 1:
        # a group is scored by the sum of its two best experts
        mask = _group_mask(choice, n_group, topk_group, lambda g: g.topk(2, dim=-1)[0].sum(-1))
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def route_v2_torch(logits: torch.Tensor, *, top_k: int, method: str, n_group: int, topk_group: int,
                   norm_topk_prob: bool, scaling: float):
    """V2: softmax scores; `greedy` or `group_limited_greedy` (a group is scored by its max)."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if method == "group_limited_greedy":
        mask = _group_mask(scores, n_group, topk_group, lambda g: g.max(dim=-1).values)
        scores = scores.masked_fill(~mask, 0.0)
    elif method != "greedy":
        raise ValueError(f"unknown topk_method {method!r} (expected greedy or group_limited_greedy)")
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids
