"""Expert parallelism: which rank holds which expert, and the all-to-all exchange of each MoE layer.

Dispatch sends every (token, choice) to the rank that owns the chosen expert; the owner runs its
local experts on what it received; combine sends the weighted results back, where each token sums
its choices. A rank with no tokens still takes part, so the collectives of all ranks match.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scheduler.expert_placement import Placement, default_placement


class ExpertPlacement:
    """Logical expert -> physical slots (rank * S + slot), from a scheduler.expert_placement.Placement.

    A token's choice of logical expert e goes to one of e's replicas, picked by (token + choice)
    mod the replica count: deterministic, and it spreads a hot expert's tokens over its copies."""

    def __init__(self, placement: Placement, num_experts: int):
        self.placement, self.num_experts = placement, num_experts
        self.world_size, self.slots_per_rank = placement.world_size, placement.slots_per_rank
        reps = placement.replicas(num_experts)
        if any(not r for r in reps):
            raise ValueError(f"placement leaves expert(s) {[e for e, r in enumerate(reps) if not r]} without a slot")
        width = max(len(r) for r in reps)
        self.replicas = torch.tensor([r + [r[0]] * (width - len(r)) for r in reps], dtype=torch.int64)
        self.num_replicas = torch.tensor([len(r) for r in reps], dtype=torch.int64)

    @classmethod
    def default(cls, num_experts: int, world_size: int, num_redundant: int = 0) -> "ExpertPlacement":
        return cls(default_placement(num_experts, world_size, num_redundant), num_experts)

    def local_experts(self, rank: int) -> list[int]:
        """Logical expert of each of this rank's slots, in slot order."""
        return list(self.placement.slots[rank])

    def physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, k] logical ids -> [T, k] physical slot ids."""
        T, k = topk_ids.shape
        reps, n = self.replicas.to(topk_ids.device), self.num_replicas.to(topk_ids.device)
        pick = (torch.arange(T, device=topk_ids.device)[:, None] + torch.arange(k, device=topk_ids.device)) % n[topk_ids]
        return reps[topk_ids, pick]


@dataclass
class DispatchHandle:
    token: torch.Tensor          # [P] token index of each (token, destination rank) pair, sorted by rank
    dest: torch.Tensor           # [P] destination rank of each pair
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


class TorchAllToAll:
    """`all_to_all_single` with uneven splits (gloo and NCCL).

    A token travels once to each rank that holds any of its k chosen experts (not once per
    choice), carrying a [k] row of local slot ids (-1 where the choice lives elsewhere) and
    weights; the receiver's experts sum that token's local choices, so combine returns one
    partial sum per (token, rank) pair."""

    def __init__(self, placement: ExpertPlacement, group=None):
        self.placement, self.group = placement, group

    def _a2a(self, t: torch.Tensor, recv_counts, send_counts, async_op: bool = False):
        """One uneven all-to-all; with async_op, returns (result, work) to wait on later."""
        out = t.new_empty((sum(recv_counts),) + tuple(t.shape[1:]))
        src = t
        if t.dtype == torch.float8_e4m3fn:   # collectives reject float8: move the bytes
            src, out = t.view(torch.uint8), out.view(torch.uint8)
        work = dist.all_to_all_single(out, src.contiguous(), recv_counts, send_counts, group=self.group,
                                      async_op=async_op)
        out = out.view(t.dtype) if t.dtype == torch.float8_e4m3fn else out
        return (out, work) if async_op else out

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """-> ([received tokens [M, H], local slot ids [M, k] (-1: not here), weights [M, k]],
        works to wait on before using them, handle)."""
        T, k = topk_ids.shape
        W, S = self.placement.world_size, self.placement.slots_per_rank
        phys = self.placement.physical(topk_ids)                       # [T, k]
        dest = phys // S
        hit = torch.zeros(T, W, dtype=torch.bool, device=x.device)
        hit.scatter_(1, dest, True)
        token, rank = hit.nonzero(as_tuple=True)                       # pairs, token-major
        order = torch.argsort(rank, stable=True)
        token, rank = token[order], rank[order]
        send = torch.bincount(rank, minlength=W)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        mine = dest[token] == rank[:, None]                            # [P, k] choices served there
        slots = torch.where(mine, phys[token] % S, torch.full_like(phys[token], -1))
        weights = torch.where(mine, topk_weights[token].float(), torch.zeros_like(topk_weights[token].float()))
        # the three payloads travel together; whoever calls dispatch may compute meanwhile
        sent = [self._a2a(t, recv_counts, send_counts, async_op=True) for t in (x[token], slots, weights)]
        return [out for out, _ in sent], [work for _, work in sent], DispatchHandle(token, rank, send_counts, recv_counts, T)

    def combine(self, y: torch.Tensor, h: DispatchHandle) -> torch.Tensor:
        """Partial sums (already weighted) back to their tokens, summed over ranks."""
        back = self._a2a(y, h.send_counts, h.recv_counts)
        per_rank = y.new_zeros(h.num_tokens, self.placement.world_size, y.shape[1])
        per_rank[h.token, h.dest] = back
        return per_rank.sum(1)

    def run(self, x, topk_ids, topk_weights, experts, overlap=None):
        """Dispatch, local experts, combine. `overlap()` (the shared experts) runs while the
        dispatch is in flight; returns (routed output, overlap's result)."""
        (rx, rid, rw), works, h = self.dispatch(x, topk_ids, topk_weights)
        side = overlap() if overlap is not None else None
        for w in works:
            w.wait()
        return self.combine(experts.compute(rx, rid, rw), h), side


def make_all_to_all(backend: str, placement: ExpertPlacement, group=None):
    if backend == "torch":
        return TorchAllToAll(placement, group)
    if backend == "deepep":
        try:
            import deep_ep  # noqa: F401
        except ImportError:
            raise RuntimeError("all_to_all_backend='deepep' needs the deep_ep package (DeepEP), which is "
                               "not installed here; use all_to_all_backend='torch'") from None
        raise NotImplementedError("the DeepEP backend is not wired in yet; use all_to_all_backend='torch'")
    raise ValueError(f"unknown all-to-all backend {backend!r} (expected torch or deepep)")
