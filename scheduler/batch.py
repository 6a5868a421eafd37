"""Rank-local batch formation: decodes first, then prefill chunks under a token budget.

One schedule() per model step:
  1. running decodes (exactly one token left), one token each; when the KV pool cannot hold
     them, the most recently admitted running request is preempted by recompute;
  2. chunks of partially prefilled running requests (chunked prefill continues first);
  3. new admissions from the waiting queue, in order, while max_num_seqs, the token budget and
     KV blocks allow; an admission first attaches its cached prefix.
update() then applies the step's outcome. Nothing here reads a clock or a tensor, so the
simulator runs this very code.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.load import RankLoad
from scheduler.request import Request, RequestStatus, check_request


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]] = field(default_factory=list)   # decodes first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)
    num_decodes: int = 0   # items[:num_decodes] are decodes: one token each, the last they know

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


class BatchScheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, order: str | Callable[[Request], object] = "fcfs"):
        if max_num_seqs <= 0 or max_num_batched_tokens < max_num_seqs:
            # Every running request may need a decode token in one step.
            raise ValueError(f"need 0 < max_num_seqs ({max_num_seqs}) <= "
                             f"max_num_batched_tokens ({max_num_batched_tokens})")
        if order != "fcfs" and not callable(order):
            raise ValueError(f"order must be 'fcfs' or a key function, got {order!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # One request may never outgrow the whole pool: past that it could only preempt itself forever.
        self._max_len = min(max_model_len, block_manager.num_blocks * block_manager.block_size)
        self._key = None if order == "fcfs" else order
        self.waiting: list[Request] = []    # fcfs: add order; preempted requests go to the front
        self.running: list[Request] = []    # admission order; the tail is the preemption victim
        self._resumed: set[Request] = set()  # preempted, waiting to be re-admitted ahead of others
        self.last_step_time_s = 0.0         # set by the driver, reported in load()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        bm = self.block_manager
        try:
            check_request(req.num_prompt_tokens, req.max_tokens, self.max_model_len, bm.num_blocks,
                          bm.block_size)
        except ValueError as e:
            raise ValueError(f"request {req.request_id}: {e}") from None
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def schedule(self, budget: int | None = None) -> ScheduledBatch:
        """`budget`: this step's token budget from the global plan (SBS's level budgets), at most
        max_num_batched_tokens; None: max_num_batched_tokens. Decodes are never cut: a budget below
        the running decodes is raised to them (a global plan gives at least that anyway)."""
        batch = ScheduledBatch()
        scheduled: set[Request] = set()
        RUNNING = RequestStatus.RUNNING
        # Running requests with exactly one token left (remaining_tokens, inlined: hot loop).
        decodes = [r for r in self.running if r.status is RUNNING
                   and len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens == 1]
        if budget is None:
            budget = self.max_num_batched_tokens
        elif budget < 0:
            raise ValueError(f"step budget must be >= 0, got {budget}")
        else:
            budget = max(len(decodes), min(int(budget), self.max_num_batched_tokens))
        # 1. Decodes. max_num_batched_tokens >= max_num_seqs, and a step budget is raised to the
        #    decodes, so the budget always covers them.
        items, block_size = batch.items, self.block_manager.block_size
        for req in decodes:
            if req.status is not RUNNING:   # preempted by an earlier decode of this step
                continue
            # A slot left in its last block needs no allocation (what _reserve would find).
            if req.num_computed_tokens < len(req.block_table) * block_size or \
                    self._reserve(req, 1, scheduled, batch):
                items.append((req, 1))
                scheduled.add(req)
                budget -= 1
        batch.num_decodes = len(items)
        # 2. Partially prefilled requests continue before anyone new starts.
        for req in (list(self.running) if len(scheduled) < len(self.running) else ()):
            if budget <= 0:
                break
            if req.status is RequestStatus.RUNNING and req not in scheduled:
                n = self._reserve(req, min(req.remaining_tokens, budget), scheduled, batch)
                if n:
                    batch.items.append((req, n))
                    scheduled.add(req)
                    budget -= n
        # 3. Admissions. Not in a step that preempted: memory is short, and a victim must not be
        #    re-admitted in the very batch that evicted it.
        if batch.preempted:
            return batch
        if self._key is not None:
            key = self._key
            self.waiting.sort(key=lambda r: (0,) if r in self._resumed else (1, key(r)))  # stable
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            self.block_manager.allocate_prefix(req)
            n = min(req.remaining_tokens, budget)
            if not self.block_manager.can_append(req, n):
                # Head-of-line blocking keeps the order honest; undo the prefix attach.
                self.block_manager.free(req)
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            self.block_manager.append(req, n)
            self.waiting.pop(0)
            self._resumed.discard(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Request]:
        finished = []
        FINISHED, max_len = RequestStatus.FINISHED, self._max_len
        commit = self.block_manager.commit if self.block_manager.enable_prefix_caching else None
        for req, n in batch.items:   # each request once, its derived values computed once
            if req.status is FINISHED:   # finished (e.g. aborted) between schedule() and update()
                continue
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            if commit is not None:
                commit(req)
            out = req.output_token_ids
            num_tokens = len(req.prompt_token_ids) + len(out)
            if computed < num_tokens:
                continue          # a prefill chunk short of the end: no logits were sampled
            try:
                out.append(sampled[req.request_id])
            except KeyError:
                raise KeyError(f"request {req.request_id} reached its last token but no token was sampled") \
                    from None
            if len(out) >= req.max_tokens or num_tokens + 1 >= max_len:
                self.finish(req, "length")
                finished.append(req)
        return finished

    def finish(self, req: Request, reason: str) -> None:
        """Stop/abort/error (and "length" from update): free the blocks and forget the request."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            self._resumed.discard(req)
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def detach(self, req: Request) -> None:
        """P/D separation, prefill side: stop scheduling `req` but keep its KV blocks (they are
        being sent to a decode rank); release them later with block_manager.free."""
        self.running.remove(req)

    def adopt(self, req: Request) -> None:
        """P/D separation, decode side: a request whose KV arrived from a prefill rank joins the
        running batch (its blocks are already allocated and filled)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def load(self, rank: int = 0) -> RankLoad:
        bm = self.block_manager
        running_tokens, prefill_tokens = 0, sum(r.remaining_tokens for r in self.waiting)
        for r in self.running:   # one pass; num_tokens and remaining_tokens inlined
            n = len(r.prompt_token_ids) + len(r.output_token_ids)
            running_tokens += n
            if n - r.num_computed_tokens > 1:   # a prefill (a decode has one token left)
                prefill_tokens += n - r.num_computed_tokens
        return RankLoad(
            rank=rank,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            waiting_prefill_tokens=prefill_tokens,
            running_tokens=running_tokens,
            free_kv_blocks=bm.num_free_blocks,
            total_kv_blocks=bm.num_blocks,
            block_size=bm.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            last_step_time_s=self.last_step_time_s,
        )

    # ---- internals ---------------------------------------------------------------------------
    def _reserve(self, req: Request, want: int, scheduled: set[Request], batch: ScheduledBatch) -> int:
        """Grow req's blocks for up to `want` tokens (a prefill chunk shrinks to what fits).
        While not even one token fits, preempt the most recently admitted running request not yet
        scheduled this step, possibly req itself. Returns the tokens granted, 0 if req was preempted."""
        bm = self.block_manager
        while (n := min(want, bm.num_appendable_tokens(req))) == 0:
            victim = next(r for r in reversed(self.running) if r not in scheduled)
            self._preempt(victim, batch)
            if victim is req:
                return 0
        bm.append(req, n)
        return n

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        # Recompute, not swap: the KV is dropped and rebuilt from prompt + outputs on re-admission
        # (the prefix cache usually gives most of it back for free).
        self.running.remove(req)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.insert(0, req)
        self._resumed.add(req)
        batch.preempted.append(req)
