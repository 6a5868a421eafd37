"""The global scheduler's interface: which rank admits which request at which step boundary.

The contract, with its extensions (instance subsets, per-rank context, timers): docs/scheduler_api.md.
Every decision is a function of (now, loads, internal state): no clocks are read, no randomness is
used, so every rank that runs the same sequence of calls computes the same plan.
"""
from dataclasses import dataclass, field

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


def take_out(queue: list[Request], request_id: str) -> Request | None:
    """Remove the request with this id from `queue` and return it (None: not there)."""
    for i, r in enumerate(queue):
        if r.request_id == request_id:
            return queue.pop(i)
    return None


@dataclass
class StepPlan:
    assignments: dict[int, list[Request]] = field(default_factory=dict)   # rank -> requests admitted now
    # rank -> token budget of its next step (SBS's common level); None: each rank's own maximum
    budgets: dict[int, int] | None = None

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
        self.sent = [0] * num_ranks                  # tokens handed over since that rank's report
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

    def add_ranks(self, ranks) -> None:
        """Ranks that (re)joined: an instance registered with the global scheduler."""
        self.dead -= set(ranks)

    def live_ranks(self) -> list[int]:
        return [r for r in range(self.num_ranks) if r not in self.dead]

    def next_wakeup(self, now: float) -> float | None:
        return None

    # ---- shared bookkeeping ------------------------------------------------------------------
    def record_loads(self, loads: list[RankLoad]) -> None:
        for ld in loads:
            if not 0 <= ld.rank < self.num_ranks:
                raise ValueError(f"load report for rank {ld.rank}, scheduler has {self.num_ranks} ranks")
            self.loads[ld.rank] = ld
            self.sent[ld.rank] = 0   # the report now covers everything handed over before

    def hand_over(self, assignments: dict[int, list[Request]]) -> StepPlan:
        for rank, reqs in assignments.items():
            self.sent[rank] += sum(r.num_tokens for r in reqs)
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
        return base + self.sent[rank]
