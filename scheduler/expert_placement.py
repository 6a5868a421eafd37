"""Expert-parallel load balancing (EPLB) planning: pure Python, no torch.

Given how many tokens each logical expert of one MoE layer received, choose which expert each of
the W x S physical slots holds (S slots per rank, W x S >= E, so W x S - E slots are redundant
copies):
  1. replicate: every expert gets one slot; each spare slot goes to the expert whose load per
     replica is highest now (so a hot expert's traffic is split between copies);
  2. pack: replicas, heaviest first, go to the least-loaded rank that has a free slot and does not
     already hold that expert; among ranks within `tolerance` of the lightest, prefer the one that
     holds the most experts co-activated with this one in the previous layer (fewer tokens then
     cross ranks between consecutive layers).
The result keeps every rank's expected load as even as the slot counts allow.
"""
from dataclasses import dataclass


@dataclass
class Placement:
    """slots[r][s] = the logical expert held in slot s of rank r."""
    slots: list[list[int]]

    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    def replicas(self, num_experts: int) -> list[list[int]]:
        """Physical slot ids (rank * S + s) holding each logical expert."""
        out = [[] for _ in range(num_experts)]
        for r, row in enumerate(self.slots):
            for s, e in enumerate(row):
                out[e].append(r * self.slots_per_rank + s)
        return out


def _slots_per_rank(num_experts: int, world_size: int, num_redundant: int) -> int:
    total = num_experts + num_redundant
    if total % world_size:
        raise ValueError(f"num_experts + num_redundant_experts = {total} must divide evenly over "
                         f"{world_size} ranks")
    return total // world_size


def default_placement(num_experts: int, world_size: int, num_redundant: int = 0) -> Placement:
    """Contiguous ranges; redundant slots copy experts round robin (no load known yet)."""
    per = _slots_per_rank(num_experts, world_size, num_redundant)
    order = list(range(num_experts)) + [i % num_experts for i in range(num_redundant)]
    return Placement([order[r * per:(r + 1) * per] for r in range(world_size)])


def rank_loads(p: Placement, load: list[float]) -> list[float]:
    """Expected tokens per rank if each expert's load splits evenly over its replicas."""
    reps = p.replicas(len(load))
    per_slot = {slot: load[e] / len(reps[e]) for e in range(len(load)) for slot in reps[e]}
    S = p.slots_per_rank
    return [sum(per_slot[r * S + s] for s in range(S)) for r in range(p.world_size)]


def imbalance(loads: list[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def plan(load: list[float], world_size: int, num_redundant: int = 0, *,
         prev_slots: list[list[int]] | None = None,
         coactivation: list[list[float]] | None = None, tolerance: float = 0.02) -> Placement:
    """New placement for one layer. `coactivation[a][b]`: tokens that chose expert a in the previous
    layer and b in this one; `prev_slots`: the previous layer's placement (for that affinity)."""
    E = len(load)
    S = _slots_per_rank(E, world_size, num_redundant)
    count = [1] * E
    for _ in range(num_redundant):
        # a second copy on the same rank would not split anything: cap copies at one per rank
        # while some expert can still take one
        open_ = [e for e in range(E) if count[e] < world_size] or list(range(E))
        hot = max(open_, key=lambda e: (load[e] / count[e], -e))
        count[hot] += 1
    reps = sorted(((load[e] / count[e], e) for e in range(E) for _ in range(count[e])),
                  key=lambda x: (-x[0], x[1]))
    slack = tolerance * sum(load) / world_size   # "near the lightest": within this many tokens
    rank_load = [0.0] * world_size
    slots: list[list[int]] = [[] for _ in range(world_size)]
    for w, e in reps:
        ok = [r for r in range(world_size) if len(slots[r]) < S and e not in slots[r]]
        if not ok:   # only when copies outnumber ranks with room: accept a duplicate on one rank
            ok = [r for r in range(world_size) if len(slots[r]) < S]
        lightest = min(rank_load[r] for r in ok)
        near = [r for r in ok if rank_load[r] <= lightest + slack + 1e-12]
        r = max(near, key=lambda r: (_affinity(e, r, prev_slots, coactivation), -rank_load[r], -r))
        slots[r].append(e)
        rank_load[r] += w
    return Placement(slots)


def _affinity(e, r, prev_slots, coact) -> float:
    if prev_slots is None or coact is None:
        return 0.0
    return sum(coact[a][e] for a in prev_slots[r])
