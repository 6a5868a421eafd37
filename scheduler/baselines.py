"""The immediate baselines: each request goes to a rank when it arrives (round robin, least load),
and TensorRT-LLM-style attention-DP balance, which holds context requests per instance."""
from scheduler.base import GlobalScheduler, StepPlan, order_key, take_out
from scheduler.load import RankLoad
from scheduler.request import Request


class Immediate(GlobalScheduler):
    """Assign on arrival; the request is handed to its rank at that rank's next plan() call and
    then waits in the rank's local queue, where the router no longer sees it."""

    def __init__(self, num_ranks: int, role: str = "prefill"):
        super().__init__(num_ranks, role)
        self._assigned: list[list[Request]] = [[] for _ in range(num_ranks)]
        self.queued = [0] * num_ranks    # tokens assigned but not yet handed over
        self._unplaced: list[Request] = []   # arrived while no rank was live

    def pick(self, req: Request) -> int:
        raise NotImplementedError

    def add_request(self, req: Request, now: float) -> None:
        if not self.live_ranks():
            self._unplaced.append(req)
            return
        rank = self.pick(req)
        self._assigned[rank].append(req)
        self.queued[rank] += req.num_tokens

    def add_ranks(self, ranks) -> None:
        super().add_ranks(ranks)
        waiting, self._unplaced = self._unplaced, []
        for req in waiting:
            self.add_request(req, 0.0)

    def plan(self, now: float, loads: list[RankLoad]) -> StepPlan:
        self.record_loads(loads)
        out = {}
        for ld in loads:
            if self._assigned[ld.rank]:
                out[ld.rank], self._assigned[ld.rank] = self._assigned[ld.rank], []
                self.queued[ld.rank] = 0
        return self.hand_over(out)

    def num_pending(self) -> int:
        return sum(len(a) for a in self._assigned) + len(self._unplaced)

    def remove(self, request_id: str) -> bool:
        if take_out(self._unplaced, request_id) is not None:
            return True
        for rank, reqs in enumerate(self._assigned):
            if (r := take_out(reqs, request_id)) is not None:
                self.queued[rank] -= r.num_tokens
                return True
        return False

    def drop_ranks(self, ranks) -> list[Request]:
        super().drop_ranks(ranks)
        orphans = []
        for r in ranks:
            orphans += self._assigned[r]
            self._assigned[r], self.queued[r] = [], 0
        return orphans


class ImmediateRoundRobin(Immediate):
    name = "immediate-rr"

    def __init__(self, num_ranks: int, role: str = "prefill"):
        super().__init__(num_ranks, role)
        self._next = 0

    def pick(self, req: Request) -> int:
        live = self.live_ranks()
        rank = live[self._next % len(live)]
        self._next = (self._next + 1) % len(live)
        return rank


class ImmediateLeastLoad(Immediate):
    """Least outstanding tokens: last reported (queued prefill + held context) plus everything sent
    or assigned since that report (SGLang-style optimistic increments)."""
    name = "immediate-lb"

    def pick(self, req: Request) -> int:
        return min(self.live_ranks(), key=lambda r: (self.outstanding_tokens(r) + self.queued[r], r))


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
        self.record_loads(loads)
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
        taken = {q.request_id for v in out.values() for q in v}
        self.buffers[k] = [q for q in buffer if q.request_id not in taken]
        return self.hand_over(out)

    def num_pending(self) -> int:
        return sum(len(b) for b in self.buffers)

    def remove(self, request_id: str) -> bool:
        return any(take_out(b, request_id) is not None for b in self.buffers)
