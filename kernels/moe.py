"""Routed-expert computation (torch reference of the fused MoE kernel).

Experts are stacked: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I]. `topk_ids` holds
LOCAL expert indices; -1 marks a choice owned by another rank (expert parallelism), which is skipped.
"""
import torch
import torch.nn.functional as F

from . import cpu_native, cpu_threads


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    grouped: bool | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    `grouped`: run all experts as one batched GEMM over rows padded to the busiest expert (None:
    when that padding wastes little and the C loop does not apply), else one GEMM per expert (True
    or False: torch's GEMMs, the reference)."""
    inter, E = w2.shape[-1], w13.shape[0]
    out = x.new_zeros(x.shape)
    flat = topk_ids.flatten()
    # Sort the (token, choice) rows by expert once: each expert then works on one contiguous slice
    # (fewer small ops per expert than a mask per expert, which is what bounds small batches).
    order = torch.argsort(flat, stable=True)
    counts_t = torch.bincount(flat + 1, minlength=E + 1)         # [skipped, e0, e1, ...]
    counts = counts_t.tolist()
    rows = order[counts[0]:]                     # choices held here (-1 sorts first)
    n = rows.numel()
    if n == 0:
        return out
    tok = rows // topk_ids.shape[1]
    width = max(counts[1:])
    # decode on the CPU: the C loop reads each expert's weights once for all its rows (1.5x MKL's
    # per-expert GEMMs at 1-12 rows, and no padding). Not in prefill: alone it was 4-5 % faster
    # there on 2 threads, but its long runs beside torch's spinning OpenMP workers then made the
    # decode GEMMs of the same run 3.6x slower (two spinning pools on two cores).
    native = grouped is None and width <= cpu_native.MAX_ROWS and cpu_native.usable(x, w13, w2)
    if grouped is None:
        # One batched GEMM saves 2E small launches, but pads every expert to the busiest one. In
        # decode (a few rows per expert, unevenly spread) the padding triples the math while the
        # small GEMMs are bound by reading the weights, which both ways read once: measured on a
        # 32-expert top-4 model at 24 sequences (one thread), the per-expert loop took 20 % less
        # time. So only when padding adds at most a quarter.
        grouped = not native and E * width * 4 <= n * 5
    if grouped:
        expert = flat[rows]
        starts = torch.cumsum(counts_t[1:], 0) - counts_t[1:]
        slot = expert * width + (torch.arange(n, device=x.device) - starts[expert])   # row in [E*width]
        xs = x.new_zeros(E * width, x.shape[1])
        xs[slot] = x[tok]
        h = torch.bmm(xs.view(E, width, -1), w13.transpose(1, 2))
        ys = torch.bmm(F.silu(h[..., :inter]) * h[..., inter:], w2.transpose(1, 2)).view(E * width, -1)[slot]
    elif native:
        xs = x[tok]
        ys = torch.empty_like(xs)
        offsets = F.pad(torch.cumsum(counts_t[1:], 0), (1, 0))            # expert e: rows [e], [e+1]
        cpu_native.moe_experts(xs, offsets, w13, w2, ys)
    else:
        xs = x[tok]
        ys = torch.empty_like(xs)
        parts = list(zip(xs.split(counts[1:]), ys.split(counts[1:])))

        def experts(lo, hi):
            # per expert: one contiguous slice in, one written in place out (few ops: in decode the
            # per-op cost is a sizeable share of these small GEMMs)
            for e in range(lo, hi):
                xe, ye = parts[e]
                if xe.shape[0]:
                    h = F.linear(xe, w13[e])
                    torch.mm(F.silu(h[:, :inter]).mul_(h[:, inter:]), w2[e].t(), out=ye)
        cpu_threads.parallel_for(experts, E, x.device)
    ys *= topk_weights.flatten()[rows, None].to(x.dtype)
    return out.index_add_(0, tok, ys)
