"""Global (coordinator-side) schedulers: which rank admits which request at which step boundary.

Contract (docs/scheduler_api.md), with two compatible extensions:
- `plan(now, loads)` may receive the loads of a subset of ranks: the ranks of one instance at its
  step boundary (RankLoad.rank is the global rank id, 0..num_ranks-1). Only those ranks get work.
  The loads are assumed to reflect every request handed over by earlier plan() calls; what this
  scheduler hands over is counted optimistically until that rank reports again.
- `observe_step(..., ranks=None, per_rank_context=None)` names the ranks the step ran on (default:
  all, in order) and optionally the attention context (query-key pairs) each of them processed.
- `next_wakeup(now)`: a time at which plan() should be called even if no step ends and no request
  arrives (None: no timer needed). Every hold here is bounded and no policy holds work away from
  an idle group, so the built-in policies never need one; drivers honour it anyway.

Every decision is a function of (now, loads, internal state): no clocks are read, no randomness is
used, so every rank that runs the same sequence of calls computes the same plan.
"""
from dataclasses import dataclass, field

from scheduler.allocation import RankSlot, rank_slots, water_fill, choose_decode_rank, StepCostModel
from scheduler.load import RankLoad
from scheduler.ordering import make_order
from scheduler.request import Request

def order_key(order):
    """'fcfs' | 'priority' | 'sjf' (scheduler/ordering.py, with aging) | a key function -> key
    function, or None for 'fcfs' (keep buffer order)."""
    if callable(order):
        return order
    if order == "fcfs":
        return None
    return make_order(order).as_key()


@dataclass
class StepPlan:
    assignments: dict[int, list[Request]] = field(default_factory=dict)   # rank -> requests admitted now

    @property
    def num_requests(self) -> int:
        return sum(len(v) for v in self.assignments.values())


class GlobalScheduler:
    name = "base"

    def __init__(self, num_ranks: int, role: str = "prefill"):
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        self.num_ranks, self.role = num_ranks, role
        self.dead: set[int] = set()                   # ranks whose instance died (never planned again)
        self.loads: dict[int, RankLoad] = {}          # last report per rank
        self._sent = [0] * num_ranks                  # tokens handed over since that rank's report
        self._step_ema: dict[tuple, float] = {}       # measured step time per group of ranks

    # ---- interface ---------------------------------------------------------------------------
    def add_request(self, req: Request, now: float) -> None:
        raise NotImplementedError

    def plan(self, now: float, loads: list[RankLoad]) -> StepPlan:
        raise NotImplementedError

    def observe_step(self, now: float, step_time_s: float, per_rank_tokens: list[int], *,
                     ranks: list[int] | None = None, per_rank_context: list[float] | None = None) -> None:
        if sum(per_rank_tokens) == 0:
            return   # an idle (zero-token) step says nothing about the cost of work
        group = tuple(ranks) if ranks is not None else tuple(range(len(per_rank_tokens)))
        old = self._step_ema.get(group)
        self._step_ema[group] = step_time_s if old is None else 0.8 * old + 0.2 * step_time_s

    def num_pending(self) -> int:
        raise NotImplementedError

    def remove(self, request_id: str) -> bool:
        """Forget a request not handed over yet (aborted): True if it was held here."""
        raise NotImplementedError

    def drop_ranks(self, ranks) -> list[Request]:
        """Ranks that died: never plan for them again; returns requests pinned to them that were
        not handed over yet, for the caller to re-add."""
        self.dead |= set(ranks)
        for r in ranks:
            self.loads.pop(r, None)
        return []

    def live_ranks(self) -> list[int]:
        return [r for r in range(self.num_ranks) if r not in self.dead]

    def next_wakeup(self, now: float) -> float | None:
        return None

    # ---- shared bookkeeping ------------------------------------------------------------------
    def _check_loads(self, loads: list[RankLoad]) -> None:
        for ld in loads:
            if not 0 <= ld.rank < self.num_ranks:
                raise ValueError(f"load report for rank {ld.rank}, scheduler has {self.num_ranks} ranks")
            self.loads[ld.rank] = ld
            self._sent[ld.rank] = 0   # the report now covers everything handed over before

    def _hand_over(self, assignments: dict[int, list[Request]]) -> StepPlan:
        for rank, reqs in assignments.items():
            self._sent[rank] += sum(r.num_tokens for r in reqs)
        return StepPlan({r: v for r, v in sorted(assignments.items()) if v})

    def step_time(self, ranks) -> float | None:
        """Measured step time of the group (EMA), else the largest last_step_time reported."""
        t = self._step_ema.get(tuple(ranks))
        if t is None:
            t = max((self.loads[r].last_step_time_s for r in ranks if r in self.loads), default=0.0) or None
        return t

    def outstanding_tokens(self, rank: int) -> int:
        """Reported queued prefill + held context, plus what was sent since (optimistic)."""
        ld = self.loads.get(rank)
        base = ld.waiting_prefill_tokens + ld.running_tokens if ld else 0
        return base + self._sent[rank]


class _Immediate(GlobalScheduler):
    """Assign on arrival; the request is handed to its rank at that rank's next plan() call and
    then waits in the rank's local queue, where the router no longer sees it."""

    def __init__(self, num_ranks: int, role: str = "prefill"):
        super().__init__(num_ranks, role)
        self._assigned: list[list[Request]] = [[] for _ in range(num_ranks)]
        self._queued = [0] * num_ranks    # tokens assigned but not yet handed over

    def pick(self, req: Request) -> int:
        raise NotImplementedError

    def add_request(self, req: Request, now: float) -> None:
        rank = self.pick(req)
        self._assigned[rank].append(req)
        self._queued[rank] += req.num_tokens

    def plan(self, now: float, loads: list[RankLoad]) -> StepPlan:
        self._check_loads(loads)
        out = {}
        for ld in loads:
            if self._assigned[ld.rank]:
                out[ld.rank], self._assigned[ld.rank] = self._assigned[ld.rank], []
                self._queued[ld.rank] = 0
        return self._hand_over(out)

    def num_pending(self) -> int:
        return sum(len(a) for a in self._assigned)

    def remove(self, request_id: str) -> bool:
        for rank, reqs in enumerate(self._assigned):
            for r in reqs:
                if r.request_id == request_id:
                    reqs.remove(r)
                    self._queued[rank] -= r.num_tokens
                    return True
        return False

    def drop_ranks(self, ranks) -> list[Request]:
        super().drop_ranks(ranks)
        orphans = []
        for r in ranks:
            orphans += self._assigned[r]
            self._assigned[r], self._queued[r] = [], 0
        return orphans


class ImmediateRoundRobin(_Immediate):
    name = "immediate-rr"

    def __init__(self, num_ranks: int, role: str = "prefill"):
        super().__init__(num_ranks, role)
        self._next = 0

    def pick(self, req: Request) -> int:
        live = self.live_ranks()
        rank = live[self._next % len(live)]
        self._next = (self._next + 1) % len(live)
        return rank


class ImmediateLeastLoad(_Immediate):
    """Least outstanding tokens: last reported (queued prefill + held context) plus everything sent
    or assigned since that report (SGLang-style optimistic increments)."""
    name = "immediate-lb"

    def pick(self, req: Request) -> int:
        return min(self.live_ranks(), key=lambda r: (self.outstanding_tokens(r) + self._queued[r], r))


class AdpBalance(GlobalScheduler):
    """TensorRT-LLM-style attention-DP balance, an intra-instance mechanism: each request goes on
    arrival to an instance, round robin (`instances` equal groups of consecutive ranks), and waits
    in that instance's queue. While every rank of the instance is busy, new (context) requests are
    held until each rank with a free slot can get one, or until `timeout_iters` step boundaries have
    passed; `batching_wait_iters` optionally holds a few boundaries more to batch context work
    (TensorRT-LLM's defaults are 50 and 10; 0 here, which only shortens waits). When a rank is idle
    nothing is held. Released requests go, in order, to the rank with the fewest outstanding tokens
    that has a free sequence slot."""
    name = "adp-balance"

    def __init__(self, num_ranks: int, *, instances: int = 1, timeout_iters: int = 50,
                 batching_wait_iters: int = 0, order="fcfs", role: str = "prefill"):
        super().__init__(num_ranks, role)
        if timeout_iters < 0 or batching_wait_iters < 0:
            raise ValueError("timeout_iters and batching_wait_iters must be >= 0")
        if instances <= 0 or num_ranks % instances:
            raise ValueError(f"{num_ranks} ranks do not split into {instances} equal instances")
        self.timeout_iters, self.batching_wait_iters = timeout_iters, batching_wait_iters
        self.key = order_key(order)
        self.per_instance = num_ranks // instances
        self.buffers: list[list[Request]] = [[] for _ in range(instances)]
        self._next = 0
        self._iters = [0] * instances

    def add_request(self, req: Request, now: float) -> None:
        self.buffers[self._next].append(req)
        self._next = (self._next + 1) % len(self.buffers)

    def plan(self, now: float, loads: list[RankLoad]) -> StepPlan:
        self._check_loads(loads)
        if not loads:
            return StepPlan()
        k = loads[0].rank // self.per_instance
        buffer = self.buffers[k]
        if not buffer:
            self._iters[k] = 0
            return StepPlan()
        free = {ld.rank: ld.max_num_seqs - ld.num_running - ld.num_waiting for ld in loads}
        all_busy = all(ld.num_running or ld.num_waiting for ld in loads)
        it = self._iters[k]
        enough = len(buffer) >= sum(1 for f in free.values() if f > 0)
        if all_busy and it < self.timeout_iters and (not enough or it < self.batching_wait_iters):
            self._iters[k] = it + 1
            return StepPlan()
        self._iters[k] = 0
        order = sorted(buffer, key=self.key) if self.key else list(buffer)
        out: dict[int, list[Request]] = {}
        extra = {r: 0 for r in free}
        for req in order:
            ranks = [r for r in free if free[r] > 0]
            if not ranks:
                break
            r = min(ranks, key=lambda r: (self.outstanding_tokens(r) + extra[r], r))
            out.setdefault(r, []).append(req)
            free[r] -= 1
            extra[r] += req.num_tokens
        taken = {id(q) for v in out.values() for q in v}
        self.buffers[k] = [q for q in buffer if id(q) not in taken]
        return self._hand_over(out)

    def num_pending(self) -> int:
        return sum(len(b) for b in self.buffers)

    def remove(self, request_id: str) -> bool:
        for k, buffer in enumerate(self.buffers):
            self.buffers[k] = [r for r in buffer if r.request_id != request_id]
            if len(self.buffers[k]) < len(buffer):
                return True
        return False


def make_global_scheduler(name: str, num_ranks: int, **options) -> GlobalScheduler:
    """names: immediate-rr, immediate-lb, sbs, adp-balance, immediate-gimbal (scheduler/dispatch.py). `instances=M` tells how the ranks split
    into M lockstep groups (only adp-balance, whose queues are per instance, needs it). `role="decode"` builds the dispatcher of
    a decode pool (P/D separation): placement only, nothing held (adp-balance decodes as
    immediate-lb there; sbs uses its decode-side rule)."""
    from scheduler.dispatch import ImmediateGimbal   # lazy: both modules import this one
    from scheduler.sbs import StaggeredBatchScheduler
    classes = {c.name: c for c in (ImmediateRoundRobin, ImmediateLeastLoad, StaggeredBatchScheduler, AdpBalance,
                                   ImmediateGimbal)}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(classes))}")
    cls = classes[name]
    if options.get("role") == "decode" and cls is AdpBalance:
        cls, options = ImmediateLeastLoad, {"role": "decode"}
    if cls is not AdpBalance:
        options.pop("instances", None)   # the others see instances through the groups plan() receives
    try:
        return cls(num_ranks, **options)
    except TypeError as e:
        raise ValueError(f"bad options for scheduler {name!r}: {e}") from None


__all__ = ["StepPlan", "GlobalScheduler", "ImmediateRoundRobin", "ImmediateLeastLoad", "AdpBalance",
           "make_global_scheduler", "order_key", "RankSlot", "StepCostModel", "rank_slots", "water_fill",
           "choose_decode_rank"]
