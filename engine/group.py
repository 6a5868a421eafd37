"""How the coordinator talks to the DP ranks of one instance.

`LocalGroup` is the single-process case (one rank, no communication). `engine.distributed`
provides the torch.distributed version with the same three calls; every rank makes the same calls
in the same order each step, which is what keeps ranks in lockstep.
"""


class LocalGroup:
    rank = 0
    world_size = 1
    is_leader = True

    def gather(self, obj):
        """Every rank's obj, on the coordinator (None elsewhere)."""
        return [obj]

    def broadcast(self, obj):
        """The coordinator's obj, on every rank."""
        return obj
