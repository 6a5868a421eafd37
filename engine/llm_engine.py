"""One instance's step loop over its DP ranks, planned by a coordinator.

One step (ARCHITECTURE.md, "One step"): gather rank loads -> the coordinator plans which new
requests each rank admits -> the plan is broadcast -> every rank runs one forward (an empty one if
it has no work) -> tokens and step stats are gathered back to the coordinator. Every decision is
made on the coordinator from gathered state, so ranks can never disagree about what to do.
"""
from collections.abc import Iterator

from .coordinator import Coordinator, StepPlanMsg, StepRecord  # noqa: F401 (re-exported)
from .group import LocalGroup
from .outputs import RequestOutput
from .worker import RankWorker


class LLMEngine:
    """`coordinator`: a Coordinator (one instance: every rank keeps one, the leader's decides and
    the others mirror its outputs), or on an instance leader an engine.instances.RemoteCoordinator
    (several instances behind one global scheduler; other ranks then have none)."""

    def __init__(self, worker: RankWorker, coordinator, group=None, ranks=None, instance: int = 0):
        self.worker, self.coordinator = worker, coordinator
        self.group = group or LocalGroup()
        self.ranks = ranks or list(range(self.group.world_size))   # global ranks of this instance
        self.instance = instance
        self.stopped = False   # the coordinator said there is nothing left (multi-instance)

    @property
    def is_leader(self) -> bool:
        return self.group.is_coordinator

    def __getattr__(self, name):
        # add_request, abort, outputs, steps, policy, cfg, step_metrics ... live on the coordinator
        coord = self.__dict__.get("coordinator")
        if coord is None:
            raise AttributeError(name)
        return getattr(coord, name)

    def has_unfinished(self) -> bool:
        if isinstance(self.coordinator, Coordinator):
            return self.coordinator.has_unfinished()
        return not self.stopped

    def step(self) -> list[RequestOutput]:
        """One lockstep step on every rank of this instance; returns the outputs that changed."""
        loads = self.group.gather(self.worker.load())
        msg = self.coordinator.plan(loads, self.ranks, self.instance) if self.is_leader else None
        msg: StepPlanMsg = self.group.broadcast(msg)
        for spec in msg.assignments.get(self.worker.rank, []):
            self.worker.add(spec)
        for rid in msg.aborts:
            self.worker.abort(rid)
        if msg.rebalance:
            self.worker.rebalance()
        if self.worker.transfers is not None:   # P/D: KV moves between prefill and decode ranks
            for send in msg.sends.get(self.worker.rank, []):
                self.worker.send_kv(send)
            for recv in msg.recvs.get(self.worker.rank, []):
                self.worker.recv_kv(recv)
            self.worker.transfers.poll(wait=msg.stop)
        events, stats = self.worker.step()
        gathered = self.group.gather((events, stats))
        changed = self.coordinator.collect(gathered, msg, self.ranks, self.instance) if self.is_leader else None
        changed = self.group.broadcast(changed)
        self.stopped = msg.stop
        if not self.is_leader and isinstance(self.coordinator, Coordinator):
            for out in changed:   # mirror the leader's view, so every rank returns full outputs
                self.coordinator.outputs[out.request_id] = out
                if out.finished:
                    self.coordinator.unfinished.discard(out.request_id)
        return changed

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request is done, yielding outputs as they change; callers may
        add requests between items (online serving)."""
        while self.has_unfinished():
            yield from self.step()
