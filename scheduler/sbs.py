"""Staggered Batch Scheduling (after arXiv 2512.16134, as far as it is public; see FACTS.md).

The queue lives here, not inside the ranks: a request leaves the buffer only for a rank that can
start it in its very next step (a free sequence slot, token budget left after the rank's own queued
prefill and decodes, KV blocks for the prompt). Nothing therefore waits unseen behind a running
batch, and when several instances (lockstep groups) stand behind this buffer, whichever reaches a
step boundary first takes the buffered work: with their step clocks offset, a free instance comes up
about every T/M instead of every T.

At a group's step boundary (plan()) the buffer is released when
  - a rank of the group is idle (it can take a new batch right now), or
  - the buffered work fills `fill_fraction` of the group's free token budgets, or
  - the oldest buffered request has waited `hold_steps` measured step times (`hold_s` overrides), or
  - holding is pointless: at the measured arrival rate, what arrives before that bound would not
    fill the budgets either (the throughput-adaptive part of the interval: at low load it shrinks
    to "every boundary", at high load the buffer fills the ranks' budgets by itself).
Release = water-filling (scheduler/allocation.py): requests in priority order (`order`), each to the
least-filled rank by a prefill cost model (tokens and attention context, minus estimated
prefix-cache hits) fitted online from observe_step. Ranks whose KV use is an interquartile-range
outlier take no new work while others can. `max_wait_s` bounds every hold: a request buffered that
long moves to the head of the line and no younger request is placed before it, so nothing starves
(a wait for capacity that no rank has is not a hold: the request goes as soon as a rank can take it).

Step-level budgets (`level`, on by default): at every boundary each rank of the group also gets a
token budget for this step, one common level for all (level_budgets): the water level of the
group's pending prefill work, never below min_chunk() (a multiple of c0 / c_tok of the fitted cost
model, so the fixed per-step cost stays a bounded share of a step). A long prompt is then chunked
to the level of the others and continues next step, instead of one rank running its full chunk
budget while the others wait at the all-to-all; under heavy load the level reaches each rank's
maximum and the budgets stop mattering. The budgets travel in StepPlan.budgets (None from the
immediate baselines: each rank's own maximum).

role="decode" (the decode pool of P/D separation): prefilled requests go, at the pool group's
boundary, to the rank chosen by the decode rule (IQR KV outliers excluded, then fewest sequences,
then lowest KV use), among ranks with a slot and KV blocks for the transferred context.
"""
import math
from collections import OrderedDict, deque

from scheduler.allocation import StepCostModel, choose_decode_rank, iqr_outliers, place_in_order, rank_slots
from scheduler.allocation import take, water_fill, water_level
from scheduler.base import GlobalScheduler, StepPlan, order_key, take_out
from scheduler.load import RankLoad
from scheduler.prefix import block_hashes
from scheduler.request import Request


class StaggeredBatchScheduler(GlobalScheduler):
    name = "sbs"

    def __init__(self, num_ranks: int, *, order="fcfs", max_wait_s: float = 2.0, hold_steps: float = 0.0,
                 hold_s: float | None = None, fill_fraction: float = 0.9, prefix_aware: bool = True,
                 kv_watermark: float = 0.01, cost_prior=(0.01, 2e-5, 1e-9), rate_window: int = 64,
                 adaptive: bool = True, lpt: bool = True, level: bool = True, chunk_factor: float = 4.0,
                 role: str = "prefill"):
        super().__init__(num_ranks, role)
        if max_wait_s <= 0 or hold_steps < 0 or (hold_s is not None and hold_s < 0):
            raise ValueError("max_wait_s must be > 0, hold_steps and hold_s >= 0")
        if not 0 < fill_fraction <= 1:
            raise ValueError(f"fill_fraction must be in (0, 1], got {fill_fraction}")
        self.key = order_key(order)
        self.max_wait_s, self.hold_steps, self.hold_s = max_wait_s, hold_steps, hold_s
        self.fill_fraction, self.kv_watermark = fill_fraction, kv_watermark
        if chunk_factor <= 0:
            raise ValueError(f"chunk_factor must be > 0, got {chunk_factor}")
        self.prefix_aware, self.adaptive, self.lpt = prefix_aware, adaptive, lpt
        self.level, self.chunk_factor = level, chunk_factor
        self.cost = StepCostModel(prior=cost_prior)
        self.buffer: list[Request] = []
        self._since: dict[str, float] = {}                       # request id -> time buffered
        self._arrivals: deque = deque(maxlen=max(2, rate_window))  # (time, tokens)
        self._chains: dict[str, list[int]] = {}                  # request id -> prompt block hashes
        self._cached: dict[int, OrderedDict] = {}                # rank -> hashes it likely holds
        self._group_of: dict[int, tuple] = {}                    # rank -> the ranks planned with it

    # ---- interface ---------------------------------------------------------------------------
    def add_request(self, req: Request, now: float) -> None:
        self.buffer.append(req)
        self._since[req.request_id] = now
        self._arrivals.append((now, req.num_tokens))

    def num_pending(self) -> int:
        return len(self.buffer)

    def remove(self, request_id: str) -> bool:
        self._chains.pop(request_id, None)
        return take_out(self.buffer, request_id) is not None and self._since.pop(request_id) is not None

    def observe_step(self, now, step_time_s, per_rank_tokens, *, ranks=None, per_rank_context=None):
        super().observe_step(now, step_time_s, per_rank_tokens, ranks=ranks,
                             per_rank_context=per_rank_context)
        if sum(per_rank_tokens) == 0:
            return
        ctx = per_rank_context or [0.0] * len(per_rank_tokens)
        i = max(range(len(per_rank_tokens)),
                key=lambda i: (self.cost.marginal(per_rank_tokens[i], ctx[i]), -i))
        self.cost.observe(step_time_s, per_rank_tokens[i], ctx[i])

    def plan(self, now: float, loads: list[RankLoad]) -> StepPlan:
        self.record_loads(loads)
        if not loads:
            return StepPlan()
        budgets = shares = None
        if self.level and self.role == "prefill":
            budgets, shares = self.level_budgets(loads)
        if not self.buffer:
            return StepPlan(budgets=budgets)
        bs = loads[0].block_size
        slots = rank_slots(loads, self.cost, self.kv_watermark, shares)
        # The hold decision weighs the buffer against the ranks' full budgets: against the level
        # shares it would always fill them (the level is where the buffer fills them).
        full = slots if shares is None else rank_slots(loads, self.cost, self.kv_watermark)
        for i in iqr_outliers([s.kv_usage for s in slots]):
            slots[i].excluded = full[i].excluded = True
        # Aging: whoever waited max_wait_s goes to the head of the line (oldest first) and is not
        # bypassed by younger work, so nothing starves behind a stream of better-ranked requests.
        order = sorted(self.buffer, key=self.key) if self.key else list(self.buffer)
        aged = sorted((r for r in order if now - self._since[r.request_id] >= self.max_wait_s),
                      key=lambda r: self._since[r.request_id])
        if aged:
            order = aged + [r for r in order if now - self._since[r.request_id] < self.max_wait_s]
        # A prompt no rank could ever hold is handed over at once: the rank rejects it with a reason.
        most = max(s.total_blocks for s in slots)
        doomed = [r for r in order if -(-(r.num_tokens + 1) // bs) > most]
        out: dict[int, list[Request]] = {}
        if doomed:
            out[min(slots, key=lambda s: (s.fill, s.rank)).rank] = list(doomed)
            order = [r for r in order if r not in doomed]
        if self.role == "decode":
            fill, _ = self._decode_fill(order, slots, bs, strict=len(aged))
        elif aged or self._release_now(now, loads, full):
            fill, _ = water_fill(order, slots, self.cost, bs, self._hits, strict=len(aged), lpt=self.lpt)
        else:
            fill = {}
        for rank, reqs in fill.items():
            out.setdefault(rank, []).extend(reqs)
        if not out:
            return StepPlan(budgets=budgets)
        assigned = {r.request_id for v in out.values() for r in v}
        self.buffer = [r for r in self.buffer if r.request_id not in assigned]
        for rank, reqs in out.items():
            for r in reqs:
                del self._since[r.request_id]
                if self.prefix_aware and self.role == "prefill":
                    self._remember(rank, self._chain(r, bs), self.loads[rank])
                self._chains.pop(r.request_id, None)
        plan = self.hand_over(out)
        plan.budgets = budgets
        return plan

    # ---- step-level budgets ------------------------------------------------------------------
    def min_chunk(self, cap: int) -> int:
        """The smallest level worth a step: `chunk_factor` times the tokens whose marginal cost
        equals the fixed per-step cost (c0 / c_tok of the fitted model), so a step's fixed part
        stays about 1 / (1 + chunk_factor) of it. Follows the fit: a machine whose steps cost
        mostly per token chunks finer than one dominated by fixed latency."""
        c0, c_tok, _ = self.cost.coefficients
        if c_tok <= 0:
            return cap
        return max(1, min(cap, int(self.chunk_factor * c0 / c_tok)))

    def level_budgets(self, loads: list[RankLoad]) -> tuple[dict[int, int], dict[int, int]]:
        """Every rank of the group gets the same token budget for its next step (see the module
        docstring): the water level of the group's pending prefill work (each rank's queued tokens
        and decodes, with the buffer poured on top, less likely prefix hits), at least min_chunk(),
        at most the rank's own maximum. Returns (budgets, shares): a share is the level without
        the min_chunk() floor, what the rank may newly admit now, so that an instance takes only
        its part of a burst and leaves the rest to the busy instances that reach a boundary after it."""
        live = [ld for ld in loads if ld.rank not in self.dead]
        if not live:
            return {}, {}
        work = [ld.num_running + ld.waiting_prefill_tokens for ld in live]
        # Ranks of other instances that are busy reach a boundary within a step and take their share
        # then: the level spreads the buffer over them too, so the first instance at a boundary does
        # not swallow a whole burst in one long step while the others idle. Idle instances are left
        # out (they take work when offered it, at an arrival, and nothing is held away from them).
        here = tuple(ld.rank for ld in loads)
        for r in here:
            self._group_of[r] = here
        busy = {g for r, g in self._group_of.items() if r in self.loads and g != here and r not in self.dead
                and (self.loads[r].num_running or self.loads[r].num_waiting or self.sent[r])}
        for g in busy:
            work += [self.loads[r].num_running + self.loads[r].waiting_prefill_tokens + self.sent[r]
                     for r in g if r in self.loads and r not in self.dead]
        pending = 0
        for r in self.buffer:
            h = max((self._hits(r, ld.rank) for ld in live), default=0) if self.prefix_aware else 0
            pending += r.num_tokens - min(h, r.num_tokens - 1)
        level = water_level(work, pending)
        budgets, shares = {}, {}
        for ld in loads:
            cap = ld.max_num_batched_tokens
            budgets[ld.rank] = max(ld.num_running, min(cap, max(self.min_chunk(cap), math.ceil(level))))
            shares[ld.rank] = max(ld.num_running + 1, min(cap, math.ceil(level)))
        return budgets, shares

    # ---- release decision --------------------------------------------------------------------
    def hold_bound(self, ranks) -> float:
        if self.hold_s is not None:
            return min(self.hold_s, self.max_wait_s)
        t = self.step_time(ranks) or self.cost.predict(0, 0)
        return min(self.hold_steps * t, self.max_wait_s)

    def arrival_rate_tokens(self) -> float:
        """Tokens per second over the last `rate_window` arrivals (0 until two have been seen)."""
        if len(self._arrivals) < 2:
            return 0.0
        span = self._arrivals[-1][0] - self._arrivals[0][0]
        return sum(t for _, t in list(self._arrivals)[1:]) / span if span > 0 else float("inf")

    def _release_now(self, now, loads, slots) -> bool:
        if any(s.idle for s in slots):
            return True
        free = sum(max(0, s.tokens) for s in slots if s.seqs > 0 and not s.excluded)
        buffered = sum(r.num_tokens for r in self.buffer)
        target = self.fill_fraction * free
        if buffered >= target:
            return True
        ranks = [ld.rank for ld in loads]
        left = self.hold_bound(ranks) - (now - min(self._since.values()))
        if left <= 0:
            return True
        # Throughput-adaptive: holding pays only if arrivals (this group's share) fill the budgets in time.
        if not self.adaptive:
            return False
        expected = self.arrival_rate_tokens() * left * len(loads) / max(1, len(self.live_ranks()))
        return buffered + expected < target

    # ---- decode placement --------------------------------------------------------------------
    def _decode_fill(self, order, slots, block_size, strict=0):
        def place(req):
            need = -(-(req.num_tokens + 1) // block_size)
            s = choose_decode_rank(slots, need)
            if s is not None:
                take(s, 0, need)
            return None if s is None else s.rank
        return place_in_order(order, place, strict)

    # ---- prefix-cache estimate ---------------------------------------------------------------
    def _chain(self, req: Request, block_size: int) -> list[int]:
        chain = self._chains.get(req.request_id)
        if chain is None:
            chain = self._chains[req.request_id] = block_hashes(req.prompt_token_ids, block_size)
        return chain

    def _hits(self, req: Request, rank: int) -> int:
        """Prompt tokens `rank` likely has cached: the head of req's block-hash chain among the
        prefixes this scheduler sent there (an estimate; the rank's own cache decides)."""
        seen = self._cached.get(rank)
        if not self.prefix_aware or not seen:
            return 0
        ld = self.loads[rank]
        n = 0
        for h in self._chain(req, ld.block_size):
            if h not in seen:
                break
            n += 1
        return n * ld.block_size

    def _remember(self, rank: int, chain: list[int], ld: RankLoad) -> None:
        seen = self._cached.setdefault(rank, OrderedDict())
        for h in chain:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > ld.total_kv_blocks:
            seen.popitem(last=False)
