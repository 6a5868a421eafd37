"""DeepSeek-V3 grouped top-k router (Triton). Same contract as kernels/router.py `route_v3_torch`.

One program per token does the whole selection in registers (E = 256 scores): sigmoid, bias,
group scores (sum of each group's two best), keep the `topk_group` best groups, top-k experts,
gather the unbiased weights, renormalize, scale. The reference is a chain of ~10 small torch
kernels per layer; here it is one launch that reads the logits once.

Scores are laid out as a [groups, experts per group] tile (both padded to powers of two), so
group reductions are row reductions. Selection is iterative argmax (k is small: 8), ties going to
the lowest index; the returned sets are unordered like torch.topk(sorted=False).
"""
import torch
import triton
import triton.language as tl

from .configs import get_config, launch_kwargs


@triton.jit
def _route_v3_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, scaling,
                     N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     TOP_K: tl.constexpr, NORM: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_E)
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)
    expert = g[:, None] * GROUP_SIZE + j[None, :]          # real expert id (meaningful where valid)
    lin = g[:, None] * BLOCK_E + j[None, :]                # unique slot id, also for padding
    logit = tl.load(logits_ptr + t * stride_l + expert, mask=valid, other=0.0).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-logit))
    bias = tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    neg_inf = float("-inf")
    # the bias steers the selection only; weights come from the unbiased scores
    choice = tl.where(valid, score + bias, neg_inf)

    if N_GROUP > 1:
        # group score = best + second best (a tie counts twice, as torch.topk(2) does)
        m1 = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == m1[:, None], j[None, :], BLOCK_E), axis=1)
        m2 = tl.max(tl.where(j[None, :] == first[:, None], neg_inf, choice), axis=1)
        gscore = tl.where(g < N_GROUP, m1 + m2, neg_inf)
        keep = g < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=0)
            pick = tl.min(tl.where(gscore == best, g, BLOCK_G), axis=0)
            keep = keep | (g == pick)
            gscore = tl.where(g == pick, neg_inf, gscore)
        choice = tl.where(keep[:, None], choice, neg_inf)

    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    ws = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == best, lin, BLOCK_G * BLOCK_E), axis=1), axis=0)
        hit = lin == pick
        w = tl.sum(tl.sum(tl.where(hit, score, 0.0), axis=1), axis=0)
        e = tl.sum(tl.sum(tl.where(hit, expert, 0), axis=1), axis=0)
        ids = tl.where(k == i, e.to(tl.int64), ids)
        ws = tl.where(k == i, w, ws)
        choice = tl.where(hit, neg_inf, choice)

    if NORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    ws = ws * scaling
    out = t * TOP_K + k
    tl.store(w_ptr + out, ws, mask=k < TOP_K)
    tl.store(ids_ptr + out, ids, mask=k < TOP_K)


def route_v3_triton(logits: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int,
                    topk_group: int, norm_topk_prob: bool, scaling: float):
    """logits fp32 [T, E] -> (weights fp32 [T, top_k], expert ids int64 [T, top_k])."""
    t, e = logits.shape
    if n_group <= 1:
        n_group, topk_group = 1, 1
    if e % n_group:
        raise ValueError(f"{e} experts do not split into {n_group} groups")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    gs = e // n_group
    cfg = get_config("router")
    _route_v3_kernel[(t,)](
        logits, bias.contiguous(), weights, ids, logits.stride(0), float(scaling),
        N_GROUP=n_group, GROUP_SIZE=gs, TOPK_GROUP=topk_group, TOP_K=top_k, NORM=bool(norm_topk_prob),
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_E=triton.next_power_of_2(gs),
        BLOCK_K=triton.next_power_of_2(top_k), **launch_kwargs(cfg))
    return weights, ids
