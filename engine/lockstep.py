"""The lockstep loop: one instance's step over its DP ranks, planned by a coordinator.

Two control-plane exchanges per step: gather (each rank's load, what its previous step produced),
the leader takes that step back and plans this one, broadcast (plan, changed outputs); then every
rank runs one forward (empty if it has no work; none when no rank has). A step's tokens thus show
at the next boundary. The online surface is the same in every run mode.
"""
import contextlib
import threading
from collections.abc import Iterator

from .coordinator import Coordinator
from .distributed import LocalGroup
from .ep import set_step_mode
from .messages import StepPlanMsg
from .outputs import RequestOutput
from .sampling import SamplingParams
from .worker import RankWorker


class LLMEngine:
    """`coordinator`: the request registry this process holds: one instance: every rank keeps a
    Coordinator (the leader's decides, the others mirror its outputs); several instances: rank 0
    holds the global scheduler's, guarded by `lock`, and the others none. `remote`: with several
    instances, the leader's engine.instances.RemoteCoordinator, which plans its steps."""

    def __init__(self, worker: RankWorker, coordinator: Coordinator | None, group=None, ranks=None,
                 instance: int = 0, *, several: bool = False, remote=None, lock=None):
        self.worker, self.coordinator = worker, coordinator
        self.single = not several   # one instance: `coordinator` plans its steps
        self.planner = coordinator if self.single else remote
        # add_request/abort may come from another thread (a server): one instance's coordinator is
        # guarded while its step boundary runs; several instances' by the global scheduler's lock
        self.lock = lock or threading.Lock()
        self._boundary_lock = self.lock if self.single else contextlib.nullcontext()
        self.group = group or LocalGroup()
        self.ranks = ranks or list(range(self.group.world_size))   # global ranks of this instance
        self.instance = instance
        self.stopped = False   # the coordinator said there is nothing left (several instances)
        self._last: StepPlanMsg | None = None   # the plan of the step in flight
        self._produced = None                   # (token events, stats) of that step, not yet reported

    @property
    def is_leader(self) -> bool:
        return self.group.is_leader

    def _registry(self) -> Coordinator:
        if self.coordinator is None:
            raise RuntimeError(f"rank {self.worker.rank} holds no coordinator: with several instances "
                               "requests, aborts and outputs live on global rank 0")
        return self.coordinator

    # ---- requests and outputs ------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request (str or token ids) -> its id. ValueError for a request that cannot run."""
        with self.lock:
            return self._registry().add_request(prompt, params, request_id=request_id,
                                                arrival_time=arrival_time)

    def abort(self, request_id: str) -> None:
        """Stop a request (idempotent); its output finishes with finish_reason "abort"."""
        with self.lock:
            self._registry().abort(request_id)

    @property
    def outputs(self) -> dict[str, RequestOutput]:
        return self._registry().outputs

    @property
    def steps(self) -> list:
        """Every step's record since the start (or the last take_steps())."""
        return self._registry().steps

    def take_steps(self) -> list:
        """Hand over the step records so far and forget them (a long-running server's way)."""
        with self.lock:
            return self._registry().take_steps()

    def drop_output(self, request_id: str) -> None:
        """Forget a finished request's output once it is handed out (a server runs for days). Like
        `outputs`, from the thread that steps (with several instances: holding `lock`)."""
        self._registry().drop_output(request_id)

    def step_metrics(self) -> dict:
        return self._registry().step_metrics()

    def request_rebalance(self) -> None:
        """EPLB at the next step boundary of every instance (a no-op on ranks without a
        coordinator: under torchrun rank 0's call covers them)."""
        if self.coordinator is not None:
            with self.lock:
                self.coordinator.request_rebalance()

    def has_unfinished(self) -> bool:
        if self.single:
            return self.coordinator.has_unfinished()
        return not self.stopped

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One lockstep step on every rank of this instance; returns the outputs that changed."""
        gathered = self.group.gather((self.worker.load(), self._produced))
        msg, changed = self.group.broadcast(self._boundary(gathered) if self.is_leader else None)
        self._last = msg
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
        set_step_mode(self.worker.runner.model, msg.decode_only)
        self._produced = self.worker.step((msg.budgets or {}).get(self.worker.rank)) if msg.run else None
        self.stopped = msg.stop
        if self.single and not self.is_leader:
            for out in changed:   # mirror the leader's view, so every rank returns full outputs
                self.coordinator.mirror(out)
        return changed

    def _boundary(self, gathered) -> tuple[StepPlanMsg, list[RequestOutput]]:
        """The leader: take back the previous step, then plan this one."""
        produced, loads, changed = [p for _, p in gathered if p is not None], [ld for ld, _ in gathered], []
        with self._boundary_lock:
            if self._last is not None and (produced or self._last.aborts):
                changed = self.planner.collect(produced, self._last, self.ranks, self.instance)
            msg = self.planner.plan(loads, self.ranks, self.instance)
        busy = any(ld.num_running or ld.num_waiting for ld in loads)
        msg.run = busy or bool(msg.assignments or msg.sends or msg.recvs)
        msg.decode_only = (all(ld.waiting_prefill_tokens == 0 for ld in loads)
                           and not any(msg.assignments.values()) and not any(msg.recvs.values()))
        return msg, changed

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request is done, yielding outputs as they change; callers may
        add requests between items (online serving)."""
        while self.has_unfinished():
            yield from self.step()
