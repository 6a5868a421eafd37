"""The coordinator: owns the global scheduler, the request registry and the outputs.

It plans each step of an instance from that instance's gathered load reports and takes back what
the step produced. With one instance it lives in the instance's leader process; with several it
sits behind engine.instances' server thread and serves every instance's leader.
"""
import dataclasses
import itertools
import time
from dataclasses import dataclass

from scheduler.load import RankLoad
from scheduler.registry import make_global_scheduler
from scheduler.request import check_request
from .messages import Recv, RequestSpec, Send, StepPlanMsg, StepStats, TokenEvent
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams


@dataclass
class StepRecord:
    time: float
    tokens_per_rank: list[int]
    step_time_s: float
    instance: int = 0

    @property
    def imbalance(self) -> float:
        mean = sum(self.tokens_per_rank) / len(self.tokens_per_rank)
        return max(self.tokens_per_rank) / mean if mean else 1.0

    @property
    def idle_fraction(self) -> float:
        return sum(1 for t in self.tokens_per_rank if t == 0) / len(self.tokens_per_rank)


class Coordinator:
    def __init__(self, model_cfg, cfg, tokenizer, max_model_len: int, num_kv_blocks: int, num_ranks: int,
                 decode_ranks: int = 0):
        """decode_ranks > 0: P/D separation; the last `decode_ranks` ranks only decode, behind a
        second scheduler (role="decode") that places prefilled requests."""
        self.model_cfg, self.cfg, self.tokenizer = model_cfg, cfg, tokenizer
        self.max_model_len, self.num_kv_blocks = max_model_len, num_kv_blocks
        self.prefill_ranks = num_ranks - decode_ranks
        self.policy = make_global_scheduler(cfg.scheduler, self.prefill_ranks, **cfg.scheduler_options)
        self.decode_policy = (make_global_scheduler(cfg.scheduler, decode_ranks, role="decode",
                                                    **cfg.scheduler_options) if decode_ranks else None)
        self._sends: dict[int, list[Send]] = {}
        self._tags = itertools.count(1)
        self.outputs: dict[str, RequestOutput] = {}
        self.unfinished: set[str] = set()
        self.steps: list[StepRecord] = []
        self.closed = False   # no more requests will come (multi-instance loops may then stop)
        self._specs: dict[str, RequestSpec] = {}
        self._where: dict[str, int] = {}      # request id -> rank it was released to
        self._instance_of: dict[int, int] = {}   # rank -> instance (filled as instances report)
        self._aborts: list[str] = []
        self._rebalances = 0                     # EPLB requests so far ...
        self._rebalanced: dict[int, int] = {}    # ... and how many each instance has carried out
        self._steps_of: dict[int, int] = {}      # instance -> steps it reported
        self._ids = itertools.count()
        self.seen: set[str] = set()   # requests whose tokens already reached a client (no restart)

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        vocab = self.model_cfg.vocab_size
        if prompt_ids and not (all(type(t) is int for t in prompt_ids) and 0 <= min(prompt_ids)
                               and max(prompt_ids) < vocab):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        blocks = self.num_kv_blocks or 1 << 62   # None: a scheduler service before any instance joined
        check_request(len(prompt_ids), params.max_tokens, self.max_model_len, blocks,
                      self.cfg.kv_block_size, room=1)

    def add_request(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request (str or token ids). Raises ValueError for a request that cannot run."""
        params = params or SamplingParams()
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, [*prompt])
        self.validate(ids, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.outputs and not self.outputs[rid].finished:
            raise ValueError(f"request id {rid!r} is already running")
        now = time.time() if arrival_time is None else arrival_time
        self.outputs[rid] = RequestOutput(rid, text, ids, text="" if self.tokenizer else None,
                                          metrics=RequestMetrics(arrival_time=now), params=params)
        self.unfinished.add(rid)
        self._specs[rid] = spec = RequestSpec(rid, ids, params, now)
        self.policy.add_request(spec.to_request(), now)
        return rid

    def abort(self, request_id: str) -> None:
        """Idempotent. A request still held by a global scheduler leaves it now (it never reaches a
        rank); one released to a rank is stopped there. Either way its output finishes with
        finish_reason "abort" at the next step boundary."""
        if request_id not in self.unfinished or request_id in self._aborts:
            return
        if not self.policy.remove(request_id) and self.decode_policy:
            self.decode_policy.remove(request_id)
        self._aborts.append(request_id)

    def settle_aborts(self) -> list[RequestOutput]:
        """Finish now the aborts of requests no rank holds (still buffered, or waiting to restart):
        a scheduler service with no live instance has no step boundary to finish them at."""
        held = [r for r in self._aborts if r not in self._where]
        if not held:
            return []
        self._aborts = [r for r in self._aborts if r in self._where]
        return self.collect([], StepPlanMsg(aborts=held), [])

    def request_rebalance(self) -> None:
        """Every instance re-places its experts at its next step boundary."""
        self._rebalances += 1

    def has_unfinished(self) -> bool:
        return bool(self.unfinished)

    # ---- one instance's step -------------------------------------------------------------------
    def plan(self, loads: list[RankLoad], ranks: list[int], instance: int = 0,
             admit: bool = True) -> StepPlanMsg:
        """admit=False: a draining instance, which gets no new work."""
        now = time.time()
        for r in ranks:
            self._instance_of[r] = instance
        decode = ranks[0] >= self.prefill_ranks
        if not admit:
            msg = StepPlanMsg()
        else:
            msg = self._plan_decode(now, loads) if decode else self._plan_prefill(now, loads)
        msg.sends = {r: self._sends.pop(r) for r in ranks if self._sends.get(r)}   # prefill ranks' KV
        msg.aborts = [r for r in self._aborts if self._where.get(r, ranks[0]) in ranks]   # rankless: anywhere
        self._aborts = [r for r in self._aborts if r not in msg.aborts]
        every, n = self.cfg.eplb_interval_steps, self._steps_of.get(instance, 0)   # this instance's steps
        asked = self._rebalanced.get(instance, 0) < self._rebalances
        msg.rebalance = asked or bool(every and n and not n % every)
        self._rebalanced[instance] = self._rebalances
        msg.stop = self.closed and not self.unfinished
        return msg

    def _plan_prefill(self, now, loads) -> StepPlanMsg:
        plan = self.policy.plan(now, loads)
        msg = StepPlanMsg(budgets=plan.budgets)
        for rank, reqs in plan.assignments.items():
            for r in reqs:
                m = self.outputs[r.request_id].metrics
                m.release_time, m.rank = now, rank
                self._where[r.request_id] = rank
            msg.assignments[rank] = [self._specs[r.request_id] for r in reqs]
        return msg

    def _plan_decode(self, now, loads) -> StepPlanMsg:
        """P/D: place prefilled requests on decode ranks; both ends of each KV move are told."""
        off = self.prefill_ranks
        plan = self.decode_policy.plan(now, [dataclasses.replace(ld, rank=ld.rank - off) for ld in loads])
        msg = StepPlanMsg()
        for local, reqs in plan.assignments.items():
            for r in reqs:
                rid, dst, tag = r.request_id, local + off, next(self._tags)
                src = self._where[rid]
                recv = Recv(self._specs[rid], src, tag, r.output_token_ids[0], r.num_prompt_tokens)
                msg.recvs.setdefault(dst, []).append(recv)
                self._sends.setdefault(src, []).append(Send(rid, dst, tag))
                self._where[rid] = dst
        return msg

    def collect(self, gathered: list[tuple[list[TokenEvent], StepStats]], msg: StepPlanMsg,
                ranks: list[int], instance: int = 0) -> list[RequestOutput]:
        changed = {}
        for rid in msg.aborts:
            out = self.outputs.get(rid)
            if out is None or out.finished:   # it finished on its own before the abort reached its
                continue                      # rank (and a server may have dropped its output since)
            out.finish_reason, out.new_token_ids = "abort", []
            out.metrics.finish_time = time.time()
            self._forget(rid)
            changed[rid] = out
        outputs = self.outputs
        for events, _ in gathered:
            for ev in events:
                rid = ev.request_id
                out = outputs[rid]
                if out.finish_reason is not None:   # finished
                    continue
                if rid not in changed:
                    out.new_token_ids = []
                    changed[rid] = out
                self._apply(out, ev)
                if ev.handoff:   # P/D: prefilled; the decode scheduler places it next
                    req = self._specs[ev.request_id].to_request([ev.token_id])
                    self.decode_policy.add_request(req, time.time())
        stats = [s for _, s in gathered]
        if not stats:   # no step ran (only aborts to report)
            return list(changed.values())
        step_time = max(s.step_time_s for s in stats)
        tokens, context = [s.num_tokens for s in stats], [s.context for s in stats]
        now = time.time()
        self.steps.append(StepRecord(now, tokens, step_time, instance))
        self._steps_of[instance] = self._steps_of.get(instance, 0) + 1
        decode = ranks[0] >= self.prefill_ranks
        policy, off = (self.decode_policy, self.prefill_ranks) if decode else (self.policy, 0)
        policy.observe_step(now, step_time, tokens, ranks=[r - off for r in ranks], per_rank_context=context)
        return list(changed.values())

    def _apply(self, out: RequestOutput, ev: TokenEvent) -> None:
        token, t = ev.token_id, ev.time
        out.token_ids.append(token)
        out.new_token_ids.append(token)
        m = out.metrics
        m.token_times.append(t)
        if m.first_token_time is None:
            m.first_token_time = t
        if ev.cached_tokens is not None:
            out.num_cached_tokens = ev.cached_tokens
        if out.text is not None:
            out.text += ev.text_delta
        if ev.finish_reason is not None:
            out.finish_reason, m.finish_time = ev.finish_reason, ev.time
            if ev.text is not None:
                out.text = ev.text
            self._forget(ev.request_id)

    def _forget(self, rid: str) -> None:
        self.unfinished.discard(rid)
        self._where.pop(rid, None)
        self._specs.pop(rid, None)

    def requeue_instance(self, instance: int, ranks=None) -> list[RequestOutput]:
        """A dead instance's unfinished requests. Those no client has seen a token of (`seen`; never
        for generate()) go back into the buffer and restart from scratch elsewhere; those whose
        tokens already reached a client end with finish_reason "error: instance lost" (a restart
        would stream different tokens after the ones already shown). Nothing is lost or finished
        twice. Returns the outputs that ended with the error."""
        if ranks is None:
            ranks = {r for r, i in self._instance_of.items() if i == instance}
        ranks = set(ranks)
        lost = [rid for rid, r in self._where.items() if r in ranks and rid in self.unfinished]
        failed, now = [], time.time()
        for rid in lost:
            out = self.outputs[rid]
            if rid in self.seen:
                out.finish_reason, out.new_token_ids = "error: instance lost", []
                out.metrics.finish_time = now
                self._forget(rid)
                failed.append(out)
                continue
            out.token_ids, out.new_token_ids = [], []
            out.text = "" if out.text is not None else None
            out.metrics.first_token_time, out.metrics.token_times = None, []
            del self._where[rid]
            self.policy.add_request(self._specs[rid].to_request(), now)
        self.set_live(ranks, False)
        for r in ranks:
            self._sends.pop(r, None)
        return failed

    def set_live(self, ranks, live: bool) -> None:
        """Ranks join (an instance registered) or leave (died, or drains): the policies plan only
        for live ranks; requests pinned to a leaving rank and not handed over yet are re-placed."""
        off, now = self.prefill_ranks, time.time()
        for policy, rs in ((self.policy, [r for r in ranks if r < off]),
                           (self.decode_policy, [r - off for r in ranks if r >= off])):
            if policy is None or not rs:
                continue
            if live:
                policy.add_ranks(rs)
            else:
                for req in policy.drop_ranks(rs):
                    policy.add_request(req, now)

    def holds(self, ranks) -> bool:
        """Does any unfinished request still run (or wait to send its KV) on these ranks?"""
        ranks = set(ranks)
        return any(r in ranks for r in self._where.values()) or any(self._sends.get(r) for r in ranks)

    def drop_output(self, request_id: str) -> None:
        """Drop a finished request's output (a long-running service hands each out once)."""
        self.outputs.pop(request_id, None)
        self.seen.discard(request_id)

    def mirror(self, out: RequestOutput) -> None:
        """A follower rank (one instance under torchrun) takes the leader's output. It never plans, so
        a finished request leaves every table here at once, its copy in the policy's buffer included;
        only its output stays, for the caller to read and drop."""
        rid = out.request_id
        self.outputs[rid] = out
        if out.finished:
            self.policy.remove(rid)
            if rid in self._aborts:
                self._aborts.remove(rid)
            self._forget(rid)

    def take_steps(self) -> list[StepRecord]:
        """Hand over the step records kept so far and forget them: a long-running server reads
        them this way (offline runs may just read `steps`)."""
        steps, self.steps = self.steps, []
        return steps

    def step_metrics(self) -> dict:
        """Over the step records held now (those take_steps() has not handed over)."""
        s = self.steps
        if not s:
            return {"steps": 0}
        return {"steps": len(s), "imbalance_mean": sum(r.imbalance for r in s) / len(s),
                "idle_fraction": sum(r.idle_fraction for r in s) / len(s),
                "step_time_mean_s": sum(r.step_time_s for r in s) / len(s)}
