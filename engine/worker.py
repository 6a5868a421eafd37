"""One DP rank's execution: its batch scheduler, KV cache, model runner, sampler and stop checks.

The worker knows nothing of other ranks: the engine hands it new requests at step boundaries and
collects what each step produced.
"""
import time

from scheduler.allocation import attention_pairs
from scheduler.batch import BatchScheduler
from scheduler.block_manager import BlockManager
from scheduler.ordering import rank_order
from scheduler.request import Request, RequestStatus
from . import pd
from .messages import Recv, RequestSpec, Send, StepStats, TokenEvent
from .detokenizer import check_stop, detokenizer
from .model_runner import ModelRunner
from .sampling import Sampler, SamplingParams


class RankWorker:
    def __init__(self, model, kv_caches, cfg, tokenizer, eos_ids, max_model_len, device, rank=0, *,
                 role: str = "mixed", transfers: pd.Transfers | None = None, balancer=None):
        """role: "mixed", or in P/D separation "prefill" (hands requests over after the first token)
        or "decode"; transfers: the rank's KV moves (P/D); balancer: engine.expert_balancer's
        ExpertBalancer (MoE models)."""
        self.rank, self.tokenizer, self.eos_ids = rank, tokenizer, frozenset(eos_ids)
        bm = BlockManager(kv_caches[0].shape[0], cfg.kv_block_size, cfg.enable_prefix_caching)
        self.scheduler = BatchScheduler(bm, max_num_seqs=cfg.max_num_seqs,
                                        max_num_batched_tokens=cfg.max_num_batched_tokens,
                                        max_model_len=max_model_len,
                                        order=rank_order(cfg.order, bm, **cfg.order_options))
        self.runner = ModelRunner(model, kv_caches, cfg.kv_block_size, device, cfg.mla_path,
                                  cfg.static_decode, cfg.max_num_seqs, max_model_len, cfg.cuda_graphs)
        self.sampler = Sampler(cfg.seed + rank)
        self.num_preempted = 0
        self.role, self.transfers, self.balancer = role, transfers, balancer
        # request id -> (request, its params, its detokenizer or None, the token ids that stop it)
        self.live: dict[str, tuple[Request, SamplingParams, object, frozenset]] = {}

    def add(self, spec: RequestSpec) -> None:
        req = spec.to_request()
        self.scheduler.add(req)
        self._track(spec, req, detokenizer(self.tokenizer))

    def _track(self, spec: RequestSpec, req: Request, detok) -> None:
        p = spec.params
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        self.live[spec.request_id] = (req, p, detok, stop_ids)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (a no-op for one this rank does not hold)."""
        if request_id not in self.live:
            return
        req = self.live.pop(request_id)[0]
        if req.is_finished or req in self.scheduler.running or req in self.scheduler.waiting:
            self.scheduler.finish(req, "abort")
        else:   # P/D: detached after its prefill, its KV not sent yet
            self.scheduler.block_manager.free(req)
        self.sampler.forget(request_id)

    def rebalance(self) -> None:
        if self.balancer is not None:
            self.balancer.rebalance()
            self.runner.drop_graphs()   # expert weights moved: captured graphs point at the old ones

    def load(self):
        return self.scheduler.load(self.rank)

    def step(self, budget: int | None = None) -> tuple[list[TokenEvent], StepStats]:
        """`budget`: this step's token budget from the plan (None: the scheduler's maximum)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule(budget)
        # attention pairs of the step (a decode over c cached tokens: c + 1, summed without a call each)
        nd = batch.num_decodes
        context = sum(r.num_computed_tokens for r, _ in batch.items[:nd]) + nd + \
            sum(attention_pairs(n, r.num_computed_tokens) for r, n in batch.items[nd:])
        logits, reqs = self.runner.run(batch)
        sampled, tokens = {}, []
        if reqs:
            live = self.live
            rids = [r.request_id for r in reqs]
            tokens = self.sampler(logits, rids, [live[rid][1] for rid in rids])
            sampled = dict(zip(rids, tokens))
        self.scheduler.update(batch, sampled)
        events = self._finish_tokens(reqs, tokens, time.time())
        if self.role == "prefill":
            self._hand_off(events)
        dt = time.perf_counter() - t0
        self.num_preempted += len(batch.preempted)
        self.scheduler.last_step_time_s = dt
        stats = StepStats(self.rank, batch.num_tokens, dt, len(batch.preempted), context)
        return events, stats

    # ---- P/D separation ----------------------------------------------------------------------
    def send_kv(self, send: Send) -> None:
        """Post the KV of a handed-off request to its decode rank; free the blocks once sent."""
        req = self.live.pop(send.request_id)[0]
        self.sampler.forget(send.request_id)
        rows = pd.gather_rows(self.runner.kv_caches, req.block_table, req.num_prompt_tokens)
        self.transfers.send(rows, send.dst, send.tag, lambda _t: self.scheduler.block_manager.free(req))

    def recv_kv(self, recv: Recv) -> None:
        """Allocate blocks for an incoming request, post the receive; it joins the batch on arrival."""
        spec = recv.spec
        req = spec.to_request()
        bm = self.scheduler.block_manager
        if not bm.can_append(req, recv.num_tokens):
            raise RuntimeError(f"rank {self.rank}: no KV room for transferred request {spec.request_id}")
        bm.append(req, recv.num_tokens)
        detok = detokenizer(self.tokenizer)
        if detok is not None:
            detok.add(recv.first_token)   # its text was already streamed by the prefill rank
        self.sampler.skip(spec.request_id, spec.params)

        def arrived(rows):
            pd.scatter_rows(self.runner.kv_caches, req.block_table, rows)
            req.num_computed_tokens = recv.num_tokens
            req.output_token_ids.append(recv.first_token)
            self._track(spec, req, detok)
            self.scheduler.adopt(req)
        c = self.runner.kv_caches[0]
        shape = (len(self.runner.kv_caches), recv.num_tokens, c.shape[-1])
        self.transfers.recv(shape, c.dtype, c.device, recv.src, recv.tag, arrived)

    def _hand_off(self, events) -> None:
        """Prefill role: requests that just got their first token stop here (blocks kept)."""
        for ev in events:
            if ev.finish_reason is None:
                self.scheduler.detach(self.live[ev.request_id][0])
                ev.handoff = True

    def _finish_tokens(self, reqs: list[Request], tokens: list[int], now: float) -> list[TokenEvent]:
        """Each sampled token's text delta, stop check and event (one pass over the step's requests;
        at a large batch this loop is the biggest part of a step's host time)."""
        live, events, FINISHED = self.live, [], RequestStatus.FINISHED
        for req, token in zip(reqs, tokens):
            rid = req.request_id
            _, params, detok, stop_ids = live[rid]
            reason = text = None
            if detok is not None:
                delta = detok.add(token)
                text = detok.text
            else:
                delta = ""
            if token in stop_ids or params.stop:
                reason, cut = check_stop(token, text or "", len(delta), stop_ids, params.stop)
                text = cut if text is not None else None
            if req.status is FINISHED:   # the scheduler ended it ("length": max_tokens, model length)
                reason = reason or req.finish_reason
            elif reason is not None:
                self.scheduler.finish(req, reason)
            ev = TokenEvent(rid, token, delta, reason, now)
            if len(req.output_token_ids) == 1:
                ev.cached_tokens = req.num_cached_tokens
            if reason is not None:
                ev.text = text   # the whole text, trimmed at a stop string
                live.pop(rid, None)
                self.sampler.forget(rid)
            events.append(ev)
        return events
