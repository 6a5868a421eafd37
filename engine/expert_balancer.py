"""EPLB at run time: count tokens per expert while serving, and re-place experts at a step boundary.

All ranks call `rebalance()` at the same step (the coordinator's plan says when). Loads are summed
over ranks, each MoE layer gets a new placement from scheduler.expert_placement.plan, and expert weights move
between ranks with one all-to-all per layer. Replicas are exact copies, so outputs do not change.
"""
import torch
import torch.distributed as dist

from scheduler import expert_placement as eplb
from .ep import ExpertPlacement


class ExpertBalancer:
    def __init__(self, model, rank: int, world_size: int, num_redundant: int, decay: float = 0.5, group=None):
        """rank / world_size: within the instance's EP group `group` (None: the whole world)."""
        self.model, self.rank, self.world, self.group = model, rank, world_size, group
        self.num_redundant, self.decay = num_redundant, decay
        self.layers = model.moe_layers()
        for layer in self.layers:
            layer.expert_load = torch.zeros(model.cfg.n_routed_experts, dtype=torch.int64,
                                            device=layer.experts.w13.device)
            if layer.ep is None:   # single rank: a trivial placement (its slots may hold copies)
                layer.placement = ExpertPlacement(eplb.Placement([list(layer.experts.slot_experts)]),
                                                  model.cfg.n_routed_experts)
        self.history: list[dict] = []

    def _placement(self, layer) -> ExpertPlacement:
        return layer.ep.placement if layer.ep is not None else layer.placement

    def loads(self) -> list[list[float]]:
        """Tokens per logical expert and layer, summed over ranks."""
        # on the device: NCCL takes no CPU tensor
        counts = torch.stack([layer.expert_load for layer in self.layers])
        if self.world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        return counts.tolist()

    def rebalance(self) -> dict:
        loads = self.loads()
        before, after, prev = [], [], None
        for layer, load in zip(self.layers, loads):
            old = self._placement(layer)
            new = eplb.plan(load, self.world, self.num_redundant, prev_slots=prev)
            before.append(eplb.imbalance(eplb.rank_loads(old.placement, load)))
            after.append(eplb.imbalance(eplb.rank_loads(new, load)))
            self._move(layer, old.placement, new)
            placement = ExpertPlacement(new, old.num_experts)
            if layer.ep is not None:
                layer.ep.placement = placement
            else:
                layer.placement = placement
            layer.experts.set_slots(new.slots[self.rank])
            layer.expert_load.copy_((layer.expert_load * self.decay).long())   # a decaying history
            prev = new.slots
        report = {"imbalance_before": sum(before) / len(before), "imbalance_after": sum(after) / len(after)}
        self.history.append(report)
        return report

    def _move(self, layer, old: eplb.Placement, new: eplb.Placement) -> None:
        """Give every rank the weights of its new slots: kept locally when it already holds that
        expert, otherwise sent by the lowest rank that holds it now."""
        ex = layer.experts
        if ex.w13_scale is not None:
            raise NotImplementedError("EPLB with FP8-resident expert weights is not supported yet")
        holders = {}
        for r in range(self.world):
            for s, e in enumerate(old.slots[r]):
                holders.setdefault(e, (r, s))
        me, mine = self.rank, {e: s for s, e in reversed(list(enumerate(old.slots[self.rank])))}
        send13, send2, send_counts, incoming = [], [], [], []
        for d in range(self.world):
            theirs = set(old.slots[d])
            n_send = 0
            for s, e in enumerate(new.slots[d]):
                if e in theirs:
                    continue
                src, src_slot = holders[e]
                if src == me:
                    send13.append(ex.w13[src_slot])
                    send2.append(ex.w2[src_slot])
                    n_send += 1
                if d == me:
                    incoming.append((src, s))
            send_counts.append(n_send)
        recv_counts = [sum(1 for r, _ in incoming if r == src) for src in range(self.world)]
        recv13 = _exchange(send13, ex.w13, send_counts, recv_counts, self.world, self.group)
        recv2 = _exchange(send2, ex.w2, send_counts, recv_counts, self.world, self.group)
        w13 = torch.empty(len(new.slots[me]), *ex.w13.shape[1:], dtype=ex.w13.dtype, device=ex.w13.device)
        w2 = torch.empty(len(new.slots[me]), *ex.w2.shape[1:], dtype=ex.w2.dtype, device=ex.w2.device)
        # arrivals come grouped by source rank, each group in slot order
        order = sorted(range(len(incoming)), key=lambda i: (incoming[i][0], incoming[i][1]))
        arrived = {incoming[i][1]: k for k, i in enumerate(order)}
        for s, e in enumerate(new.slots[me]):
            if e in mine:
                w13[s], w2[s] = ex.w13[mine[e]], ex.w2[mine[e]]
            else:
                w13[s], w2[s] = recv13[arrived[s]], recv2[arrived[s]]
        ex.w13 = torch.nn.Parameter(w13, requires_grad=False)
        ex.w2 = torch.nn.Parameter(w2, requires_grad=False)


def _exchange(rows, like, send_counts, recv_counts, world, group):
    send = torch.stack(rows) if rows else like.new_empty(0, *like.shape[1:])
    if world == 1:
        return send
    recv = like.new_empty(sum(recv_counts), *like.shape[1:])
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv
