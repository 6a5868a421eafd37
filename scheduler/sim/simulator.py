"""Discrete-event simulator: instances of DP ranks stepping in lockstep, driven by the real scheduler
code (BatchScheduler + BlockManager per rank, a GlobalScheduler deciding releases) with a cost model
in place of the GPUs.

An instance is a lockstep group: at a step boundary its ranks report loads, the global scheduler
plans, every rank forms its batch, and the step lasts as long as the cost model says the slowest
rank takes (the MoE all-to-all synchronizes them); ranks without work run a zero-token forward.
Instances step on their own clocks; one global scheduler stands behind all of them, called with
the loads of whichever instance is at a boundary. An idle instance (no work on any rank) is woken
by an arrival or by the scheduler's next_wakeup().

Modes:
  colocated: `instances` groups of `ranks` ranks, each doing prefill and decode.
  pd: `instances` prefill groups; after its prefill (the first token) a request's latent KV moves to
      a decode pool of `decode_instances` groups of `decode_ranks` ranks (transfer time = latency +
      bytes / kv_transfer_bw) and is placed there by a decode-role scheduler of the same name.

Failures and joins (colocated): `failures` [(time, instance)] kill an instance; after `detect_s` (the
engine's heartbeat silence, or ~0 for a closed connection) the global scheduler drops its ranks and its
unfinished requests restart from scratch elsewhere (engine/coordinator.py requeue_instance: the rule
for requests no client saw). `joins` [time] add an instance of `ranks` ranks, live from then on.
"""
import heapq
from dataclasses import dataclass, field

from scheduler.batch import BatchScheduler
from scheduler.block_manager import BlockManager
from scheduler.registry import make_global_scheduler
from scheduler.request import Request, RequestStatus
from scheduler.sim.cost import RankWork, RooflineCost
from scheduler.sim.metrics import Recorder


@dataclass
class SimConfig:
    mode: str = "colocated"               # colocated | pd
    instances: int = 1                    # colocated groups, or prefill groups in pd
    ranks: int = 8                        # ranks per instance
    decode_instances: int = 1             # pd only
    decode_ranks: int = 8                 # pd only, per decode instance
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192    # per rank per step (pd: the prefill ranks' chunk budget)
    decode_max_num_seqs: int = 256        # pd decode ranks
    max_model_len: int = 32768
    block_size: int = 64
    kv_blocks: int | None = None          # per rank; None: from a roofline model, else 8192
    enable_prefix_caching: bool = False
    kv_transfer_bw: float = 50e9          # bytes/s, pd
    kv_transfer_latency: float = 1e-3
    kv_bytes_per_token: int = RooflineCost.KV_BYTES_PER_TOKEN
    horizon: float | None = None          # stop at this time (None: run until every request finishes)
    scheduler_options: dict = field(default_factory=dict)
    decode_scheduler_options: dict = field(default_factory=dict)
    rank_order: object = "fcfs"           # ranks' local queue order: "fcfs", or f(block_manager) -> order key
    failures: list = field(default_factory=list)   # colocated: [(time_s, instance index)] killed then
    joins: list = field(default_factory=list)      # colocated: [time_s] a new instance joins then
    detect_s: float = 0.0                 # failure -> the scheduler presumes the instance dead


class _Rank:
    def __init__(self, gid: int, cfg: SimConfig, kv_blocks: int, max_num_seqs: int, budget: int):
        self.gid = gid
        bm = BlockManager(kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        order = cfg.rank_order(bm) if callable(cfg.rank_order) else cfg.rank_order
        self.sched = BatchScheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                    max_model_len=cfg.max_model_len, order=order)
        self.incoming: list[Request] = []   # pd decode: transferred, waiting for blocks / a slot


class _Instance:
    def __init__(self, idx: int, role: str, ranks: list[_Rank], cost, gs):
        self.idx, self.role, self.ranks, self.cost, self.gs = idx, role, ranks, cost, gs
        self.busy = False
        self.idle_since = 0.0
        self.current = None
        self.alive = True


def _kv_blocks(cfg: SimConfig, cost) -> int:
    if cfg.kv_blocks:
        return cfg.kv_blocks
    return cost.kv_blocks(cfg.block_size) if hasattr(cost, "kv_blocks") else 8192


class Simulator:
    def __init__(self, cfg: SimConfig, scheduler: str, make_cost, specs):
        """make_cost(num_ranks) -> cost model for an instance of that size; specs: RequestSpec list."""
        if cfg.mode not in ("colocated", "pd"):
            raise ValueError(f"mode must be colocated or pd, got {cfg.mode!r}")
        self.cfg, self.specs = cfg, sorted(specs, key=lambda s: s.arrival_s)
        self.name = scheduler
        self.rec = Recorder()
        self.instances: list[_Instance] = []
        if cfg.mode == "pd" and (cfg.failures or cfg.joins):
            raise ValueError("failures and joins are modelled for colocated instances only")
        count = cfg.instances + len(cfg.joins)
        gs = make_global_scheduler(scheduler, count * cfg.ranks, instances=count, **cfg.scheduler_options)
        self._build("prefill" if cfg.mode == "pd" else "colocated", count, cfg.ranks, gs, make_cost,
                    cfg.max_num_seqs, cfg.max_num_batched_tokens)
        for inst in self.instances[cfg.instances:]:   # joiners: not live until they join
            inst.alive = False
            gs.drop_ranks([r.gid for r in inst.ranks])
        self.decode_gs = None
        if cfg.mode == "pd":
            self.decode_gs = make_global_scheduler(scheduler, cfg.decode_instances * cfg.decode_ranks,
                                                   role="decode", **cfg.decode_scheduler_options)
            self._build("decode", cfg.decode_instances, cfg.decode_ranks, self.decode_gs, make_cost,
                        cfg.decode_max_num_seqs, max(cfg.decode_max_num_seqs, cfg.max_num_batched_tokens))
        self.gs = gs
        self._events: list = []
        self._seq = 0

    def _build(self, role, count, ranks, gs, make_cost, max_num_seqs, budget):
        cost = make_cost(ranks)
        blocks = _kv_blocks(self.cfg, cost)
        for i in range(count):
            rs = [_Rank(i * ranks + j, self.cfg, blocks, max_num_seqs, budget) for j in range(ranks)]
            self.instances.append(_Instance(len(self.instances), role, rs, cost, gs))

    # ---- event loop --------------------------------------------------------------------------
    def _push(self, t, kind, obj):
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj))

    def run(self) -> Recorder:
        for i, s in enumerate(self.specs):
            self._push(s.arrival_s, "arrive", i)
        for t, idx in self.cfg.failures:
            self._push(t, "fail", self.instances[idx])
        for k, t in enumerate(self.cfg.joins):
            self._push(t, "join", self.instances[self.cfg.instances + k])
        horizon = self.cfg.horizon
        now = 0.0
        while self._events:
            t, _, kind, obj = heapq.heappop(self._events)
            if horizon is not None and t > horizon:
                break
            now = t
            if kind == "arrive":
                req = self._make_request(obj, now)
                self.rec.arrived(req)
                self.gs.add_request(req, now)
                self._kick("prefill", now)
            elif kind == "step_end":
                if not obj.alive:
                    continue   # the instance died during this step: its results never arrive
                self._end_step(obj, now)
                self._start_step(obj, now)
            elif kind == "fail":
                self._fail(obj, now)
            elif kind == "lost":
                self._requeue(*obj, now)
            elif kind == "join":
                obj.alive, obj.idle_since = True, now
                self.gs.add_ranks([r.gid for r in obj.ranks])
                self._kick("prefill", now)
            elif kind == "transfer_done":
                self.decode_gs.add_request(obj, now)
                self._kick("decode", now)
            elif kind == "wake":
                self._kick(obj, now)
        self.rec.finish(horizon if horizon is not None else now, self)
        return self.rec

    def _kick(self, role, now):
        """Offer the buffer to idle instances, the one idle longest first; then arm a timer if asked."""
        roles = (role, "colocated") if role == "prefill" else (role,)
        idle = sorted((i for i in self.instances if i.alive and not i.busy and i.role in roles),
                      key=lambda i: (i.idle_since, i.idx))
        for inst in idle:
            self._start_step(inst, now)
        gs = self.decode_gs if role == "decode" else self.gs
        if any(not i.busy for i in idle) and gs.num_pending():
            w = gs.next_wakeup(now)
            if w is not None and w > now:
                self._push(w, "wake", role)

    def _make_request(self, i, now) -> Request:
        s = self.specs[i]
        ids = s.prompt_token_ids if s.prompt_token_ids is not None else [i + 1] + [0] * (s.prompt_len - 1)
        return Request(f"r{i}", ids, s.max_tokens, arrival_time=s.arrival_s, priority=s.priority,
                       session_id=s.session_id)

    # ---- failures ----------------------------------------------------------------------------
    def _fail(self, inst: _Instance, now: float) -> None:
        if not inst.alive:
            return
        inst.alive, inst.busy, inst.current = False, False, None
        lost = [r for rank in inst.ranks for r in list(rank.sched.running) + list(rank.sched.waiting)
                if not r.is_finished]
        self._push(now + self.cfg.detect_s, "lost", (inst, lost))

    def _requeue(self, inst: _Instance, lost: list[Request], now: float) -> None:
        """The scheduler presumes the instance dead: the same calls as the engine's coordinator."""
        for req in self.gs.drop_ranks([r.gid for r in inst.ranks]):   # pinned, never handed over
            self.gs.add_request(req, now)
        for old in lost:   # restart from scratch: a fresh request, same id and arrival
            self.gs.add_request(Request(old.request_id, old.prompt_token_ids, old.max_tokens,
                                        arrival_time=old.arrival_time, priority=old.priority,
                                        session_id=old.session_id), now)
        self._kick("prefill", now)

    # ---- steps -------------------------------------------------------------------------------
    def _start_step(self, inst: _Instance, now: float) -> None:
        loads = [r.sched.load(r.gid) for r in inst.ranks]
        plan = inst.gs.plan(now, loads)
        base = inst.ranks[0].gid
        for gid, reqs in plan.assignments.items():
            rank = inst.ranks[gid - base]
            for req in reqs:
                if inst.role == "decode":
                    rank.incoming.append(req)
                    continue
                req.release_time = now
                try:
                    rank.sched.add(req)
                except ValueError as e:
                    req.status, req.finish_reason = RequestStatus.FINISHED, f"error: {e}"
                    req.finish_time = now
                    self.rec.done(req)
        if inst.role == "decode":
            for rank in inst.ranks:
                rank.incoming = [r for r in rank.incoming if not self._install(rank, r, now)]
        budgets = plan.budgets or {}
        batches = [r.sched.schedule(budgets.get(r.gid)) for r in inst.ranks]
        if all(b.is_empty for b in batches):
            inst.busy, inst.idle_since = False, now
            return
        works = [self._work(b) for b in batches]
        t, busy = inst.cost.step(works)
        inst.busy, inst.current = True, (batches, works, now, t, busy)
        self._push(now + t, "step_end", inst)

    @staticmethod
    def _work(batch) -> RankWork:
        w = RankWork()
        for req, n in batch.items:
            c = req.num_computed_tokens
            w.tokens += n
            w.seqs += 1
            if c + n >= req.num_tokens:
                w.sampled += 1
            if n == 1 and c == req.num_tokens - 1 and req.output_token_ids:   # a decode
                w.decode_ctx += c + 1
            else:
                w.prefill_tokens += n
                w.prefill_pairs += n * (c + (n + 1) / 2)
        return w

    def _end_step(self, inst: _Instance, now: float) -> None:
        batches, works, start, t, busy = inst.current
        inst.current = None
        generated = 0
        for rank, batch in zip(inst.ranks, batches):
            sampled = {req.request_id: 1 for req, n in batch.items
                       if req.num_computed_tokens + n >= req.num_tokens}
            finished = rank.sched.update(batch, sampled)
            rank.sched.last_step_time_s = t
            generated += len(sampled)
            for req, _ in batch.items:
                if req.request_id in sampled and req.first_token_time is None:
                    req.first_token_time = now
            for req in finished:
                req.finish_time = now
                self.rec.done(req)
            if inst.role == "prefill":
                for req, _ in batch.items:
                    if req.request_id in sampled and not req.is_finished:
                        self._send_to_decode(rank, req, now)
        self.rec.step(inst, start, t, works, busy, generated)
        inst.gs.observe_step(now, t, [w.tokens for w in works], ranks=[r.gid for r in inst.ranks],
                             per_rank_context=[w.context for w in works])

    # ---- prefill/decode separation -------------------------------------------------------------
    def _send_to_decode(self, rank: _Rank, req: Request, now: float) -> None:
        rank.sched.finish(req, "prefilled")        # frees the prefill rank's blocks
        req.status, req.finish_reason = RequestStatus.WAITING, None
        req.num_computed_tokens = req.num_tokens - 1   # KV that travels with it
        nbytes = req.num_computed_tokens * self.cfg.kv_bytes_per_token
        arrive = now + self.cfg.kv_transfer_latency + nbytes / self.cfg.kv_transfer_bw
        self._push(arrive, "transfer_done", req)

    def _install(self, rank: _Rank, req: Request, now: float) -> bool:
        """Place a transferred request's KV into the decode rank's pool; False if it must wait."""
        s, bm = rank.sched, rank.sched.block_manager
        n = req.num_tokens - 1
        req.num_computed_tokens, req.block_table = 0, []
        if -(-n // bm.block_size) > bm.num_blocks:
            req.status, req.finish_reason = RequestStatus.FINISHED, "error: context exceeds KV pool"
            req.finish_time = now
            self.rec.done(req)
            return True
        if len(s.running) >= s.max_num_seqs or not bm.can_append(req, n + 1):
            req.num_computed_tokens = n
            return False
        bm.append(req, n)
        req.num_computed_tokens = n
        bm.commit(req)
        req.status = RequestStatus.RUNNING
        s.running.append(req)
        return True
