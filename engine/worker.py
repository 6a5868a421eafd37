"""One DP rank's execution: its batch scheduler, KV cache, model runner, sampler and stop checks.

The worker knows nothing of other ranks: the engine hands it new requests at step boundaries and
collects what each step produced.
"""
import time
from dataclasses import dataclass

import torch

from scheduler.batch import BatchScheduler
from scheduler.block_manager import BlockManager
from scheduler.request import Request
from .detokenizer import IncrementalDetokenizer, check_stop
from .model_runner import ModelRunner
from .sampling import Sampler, SamplingParams


@dataclass
class RequestSpec:
    """What crosses from the coordinator to a rank (picklable, small)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    text_delta: str
    finish_reason: str | None
    time: float
    text: str | None = None   # full (stop-trimmed) text, set when the request finishes


@dataclass
class StepStats:
    rank: int
    num_tokens: int
    num_seqs: int
    step_time_s: float
    num_preempted: int


class RankWorker:
    def __init__(self, model, kv_caches, cfg, tokenizer, eos_ids, max_model_len, device, rank=0):
        self.rank, self.tokenizer, self.eos_ids = rank, tokenizer, set(eos_ids)
        bm = BlockManager(kv_caches[0].shape[0], cfg.kv_block_size, cfg.enable_prefix_caching)
        self.scheduler = BatchScheduler(bm, max_num_seqs=cfg.max_num_seqs,
                                        max_num_batched_tokens=cfg.max_num_batched_tokens,
                                        max_model_len=max_model_len, order=_order_key(cfg.order))
        self.runner = ModelRunner(model, kv_caches, cfg.kv_block_size, device, cfg.mla_path)
        self.sampler = Sampler(cfg.seed + rank)
        self.num_preempted = 0
        self.balancer = None   # engine.eplb.ExpertBalancer, for MoE models
        self.live: dict[str, tuple[Request, SamplingParams, IncrementalDetokenizer | None]] = {}

    def add(self, spec: RequestSpec) -> None:
        req = Request(spec.request_id, spec.prompt_token_ids, spec.params.max_tokens,
                      arrival_time=spec.arrival_time, priority=spec.params.priority,
                      session_id=spec.params.session_id)
        self.scheduler.add(req)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        self.live[spec.request_id] = (req, spec.params, detok)

    def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.scheduler.finish(self.live.pop(request_id)[0], "abort")
            self.sampler.forget(request_id)

    def rebalance(self) -> dict | None:
        return self.balancer.rebalance() if self.balancer is not None else None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def load(self):
        return self.scheduler.load(self.rank)

    def step(self) -> tuple[list[TokenEvent], StepStats]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        logits, reqs = self.runner.run(batch)
        sampled = {}
        if reqs:
            params = [self.live[r.request_id][1] for r in reqs]
            tokens = self.sampler(logits, [r.request_id for r in reqs], params)
            sampled = {r.request_id: t for r, t in zip(reqs, tokens)}
        self.scheduler.update(batch, sampled)
        now = time.time()
        events = [self._finish_token(self.live[rid], tok, now) for rid, tok in sampled.items()]
        dt = time.perf_counter() - t0
        self.num_preempted += len(batch.preempted)
        self.scheduler.last_step_time_s = dt
        return events, StepStats(self.rank, batch.num_tokens, len(batch.items), dt, len(batch.preempted))

    def _finish_token(self, entry, token: int, now: float) -> TokenEvent:
        req, params, detok = entry
        delta = detok.add(token) if detok else ""
        text = detok.text if detok else ""
        reason, trimmed = check_stop(token, text, len(delta), params, self.eos_ids, req.num_output_tokens)
        if req.is_finished:                  # the scheduler ended it ("length", model length limit)
            reason = reason or req.finish_reason
        elif reason is not None:
            self.scheduler.finish(req, reason)
        ev = TokenEvent(req.request_id, token, delta, reason, now)
        if reason is not None:
            ev.text = trimmed if detok else None
            self.live.pop(req.request_id, None)
            self.sampler.forget(req.request_id)
        return ev


def _order_key(order: str):
    """Request order inside a rank: fcfs, or shortest-prompt-first ("sjf")."""
    if order == "fcfs":
        return "fcfs"
    if order == "sjf":
        return lambda r: (r.num_prompt_tokens + r.max_tokens, r.arrival_time)
    raise ValueError(f"unknown order {order!r} (expected fcfs or sjf)")
