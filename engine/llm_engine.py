"""The engine: a coordinator that owns the global scheduler, and the rank workers it drives.

One step (ARCHITECTURE.md, "One step"): gather rank loads -> the global scheduler plans which new
requests each rank admits -> the plan is broadcast -> every rank runs one forward (an empty one if
it has no work) -> tokens and step stats are gathered back. Every decision is made on the
coordinator from gathered state, so ranks can never disagree about what to do.
"""
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig
from scheduler.load import RankLoad
from scheduler.policy import make_global_scheduler
from scheduler.request import Request
from .config import EngineConfig
from .group import LocalGroup
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .worker import RankWorker, RequestSpec, StepStats, TokenEvent


@dataclass
class StepPlanMsg:
    """Broadcast to every rank at a step boundary."""
    assignments: dict[int, list[RequestSpec]] = field(default_factory=dict)
    aborts: list[str] = field(default_factory=list)
    rebalance: bool = False   # re-place experts (EPLB) before this step


@dataclass
class StepRecord:
    time: float
    tokens_per_rank: list[int]
    step_time_s: float

    @property
    def imbalance(self) -> float:
        mean = sum(self.tokens_per_rank) / len(self.tokens_per_rank)
        return max(self.tokens_per_rank) / mean if mean else 1.0

    @property
    def idle_fraction(self) -> float:
        return sum(1 for t in self.tokens_per_rank if t == 0) / len(self.tokens_per_rank)


class LLMEngine:
    def __init__(self, worker: RankWorker, model_cfg: ModelConfig, cfg: EngineConfig, tokenizer,
                 max_model_len: int, num_kv_blocks: int, group=None):
        self.worker, self.model_cfg, self.cfg, self.tokenizer = worker, model_cfg, cfg, tokenizer
        self.max_model_len, self.num_kv_blocks = max_model_len, num_kv_blocks
        self.group = group or LocalGroup()
        self.policy = make_global_scheduler(cfg.scheduler, self.group.world_size, **cfg.scheduler_options)
        self.outputs: dict[str, RequestOutput] = {}
        self.unfinished: set[str] = set()
        self._specs: dict[str, RequestSpec] = {}
        self._aborts: list[str] = []
        self._rebalance = False
        self._ids = itertools.count()
        self.steps: list[StepRecord] = []

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("empty prompt: at least one token is needed")
        if any(not isinstance(t, int) or not 0 <= t < self.model_cfg.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {self.model_cfg.vocab_size})")
        if n + 1 > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens leaves no room to generate within the context "
                             f"length max_model_len={self.max_model_len}")
        need = -(-(n + 1) // self.cfg.kv_block_size)
        if need > self.num_kv_blocks:
            raise ValueError(f"prompt of {n} tokens needs {need} KV blocks, but a rank's pool has only "
                             f"{self.num_kv_blocks}: it can never fit")

    def encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def add_request(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request (str or token ids). Raises ValueError for a request that cannot run."""
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        self.validate(ids, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.outputs and not self.outputs[rid].finished:
            raise ValueError(f"request id {rid!r} is already running")
        now = time.time() if arrival_time is None else arrival_time
        self.outputs[rid] = RequestOutput(rid, text, ids, text="" if self.tokenizer else None,
                                          metrics=RequestMetrics(arrival_time=now))
        self.unfinished.add(rid)
        self._specs[rid] = RequestSpec(rid, ids, params, now)
        if self.group.is_coordinator:
            self.policy.add_request(Request(rid, ids, params.max_tokens, arrival_time=now,
                                            priority=params.priority, session_id=params.session_id), now)
        return rid

    def abort(self, request_id: str) -> None:
        if request_id in self.unfinished:
            self._aborts.append(request_id)

    def request_rebalance(self) -> None:
        self._rebalance = True

    def has_unfinished(self) -> bool:
        return bool(self.unfinished)

    # ---- the step loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One lockstep step on every rank; returns the outputs that changed."""
        loads = self.group.gather(self.worker.load())
        msg = self._plan(loads) if self.group.is_coordinator else None
        msg = self.group.broadcast(msg)
        for spec in msg.assignments.get(self.group.rank, []):
            self.worker.add(spec)
        for rid in msg.aborts:
            self.worker.abort(rid)
        if msg.rebalance:
            self.worker.rebalance()
        events, stats = self.worker.step()
        gathered = self.group.gather((events, stats))
        changed = self._collect(gathered, msg) if self.group.is_coordinator else None
        changed = self.group.broadcast(changed)
        if not self.group.is_coordinator:   # mirror the coordinator's view on every rank
            for out in changed:
                self.outputs[out.request_id] = out
                if out.finished:
                    self.unfinished.discard(out.request_id)
        return changed

    def _plan(self, loads: list[RankLoad]) -> StepPlanMsg:
        now = time.time()
        plan = self.policy.plan(now, loads)
        every = self.cfg.eplb_interval_steps
        due = bool(every) and len(self.steps) > 0 and len(self.steps) % every == 0
        msg = StepPlanMsg(aborts=self._aborts, rebalance=self._rebalance or due)
        self._aborts, self._rebalance = [], False
        for rank, reqs in plan.assignments.items():
            for r in reqs:
                self.outputs[r.request_id].metrics.release_time = now
                self.outputs[r.request_id].metrics.rank = rank
            msg.assignments[rank] = [self._specs.pop(r.request_id) for r in reqs]
        return msg

    def _collect(self, gathered: list[tuple[list[TokenEvent], StepStats]], msg) -> list[RequestOutput]:
        changed = {}
        for rid in msg.aborts:
            out = self.outputs[rid]
            out.finish_reason = "abort"
            self.unfinished.discard(rid)
            changed[rid] = out
        for out in changed.values():
            out.new_token_ids = []
        for events, _ in gathered:
            for ev in events:
                out = self.outputs[ev.request_id]
                if out.finished:
                    continue
                if ev.request_id not in changed:
                    out.new_token_ids = []
                    changed[ev.request_id] = out
                out.token_ids.append(ev.token_id)
                out.new_token_ids.append(ev.token_id)
                m = out.metrics
                m.token_times.append(ev.time)
                if m.first_token_time is None:
                    m.first_token_time = ev.time
                if out.text is not None:
                    out.text += ev.text_delta
                if ev.finish_reason is not None:
                    out.finish_reason, m.finish_time = ev.finish_reason, ev.time
                    if ev.text is not None:
                        out.text = ev.text
                    self.unfinished.discard(ev.request_id)
        stats = [s for _, s in gathered]
        step_time = max(s.step_time_s for s in stats)
        tokens = [s.num_tokens for s in stats]
        self.steps.append(StepRecord(time.time(), tokens, step_time))
        self.policy.observe_step(time.time(), step_time, tokens)
        return list(changed.values())

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request is done, yielding outputs as they change; callers may
        add requests between items (online serving)."""
        while self.has_unfinished():
            yield from self.step()

    # ---- metrics -------------------------------------------------------------------------------
    def step_metrics(self) -> dict:
        s = self.steps
        if not s:
            return {"steps": 0}
        return {"steps": len(s), "imbalance_mean": sum(r.imbalance for r in s) / len(s),
                "idle_fraction": sum(r.idle_fraction for r in s) / len(s),
                "step_time_mean_s": sum(r.step_time_s for r in s) / len(s)}
