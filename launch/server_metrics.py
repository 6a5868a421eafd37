"""Prometheus metrics of the server (GET /metrics), fed by the engine thread.

Latency histograms come from each finished request's RequestMetrics (the engine's own clock, so
they match bench/serving.py); gauges from the rank loads the loop gathers every half second.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lbl = {"model_name": model_name}
        self._lbl = lbl

        def hist(name, doc, buckets):
            return Histogram(name, doc, list(lbl), buckets=buckets, registry=r).labels(**lbl)

        self.ttft = hist("stagger_time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS)
        self.itl = hist("stagger_inter_token_latency_seconds", "Time between consecutive tokens", ITL_BUCKETS)
        self.e2e = hist("stagger_e2e_request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS)
        self.queue = hist("stagger_request_queue_time_seconds",
                          "Arrival to release by the global scheduler (SBS buffer time)", LATENCY_BUCKETS)
        self.step_time = hist("stagger_step_time_seconds", "Duration of one lockstep step (slowest rank)",
                              ITL_BUCKETS)
        self.imbalance = Gauge("stagger_step_imbalance", "Latest busy step: max/mean tokens over ranks",
                               list(lbl), registry=r).labels(**lbl)
        self.imbalance_hist = hist("stagger_step_imbalance_ratio", "Per-step max/mean tokens over ranks",
                                   (1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 4, 8, 16))
        self.running = Gauge("stagger_num_requests_running", "Requests running on ranks", list(lbl),
                             registry=r).labels(**lbl)
        self.waiting = Gauge("stagger_num_requests_waiting", "Requests admitted to a rank, not yet running",
                             list(lbl), registry=r).labels(**lbl)
        self.buffered = Gauge("stagger_num_requests_buffered",
                              "Requests held by the global scheduler (SBS buffer)",
                              list(lbl), registry=r).labels(**lbl)
        self.instances = Gauge("stagger_num_instances", "Instances taking work (with a global scheduler "
                               "service: registered and not draining)", list(lbl), registry=r).labels(**lbl)
        self.kv = Gauge("stagger_kv_cache_usage_perc", "Fraction of a rank's KV blocks in use",
                        list(lbl) + ["rank"], registry=r)
        self.kv_free = Gauge("stagger_kv_cache_free_blocks", "Free KV blocks of a rank", list(lbl) + ["rank"],
                             registry=r)
        self.prompt_tokens = Counter("stagger_prompt_tokens", "Prompt tokens of finished requests", list(lbl),
                                     registry=r).labels(**lbl)
        self.generation_tokens = Counter("stagger_generation_tokens", "Generated tokens", list(lbl),
                                         registry=r).labels(**lbl)
        self.prefix_hits = Counter("stagger_prefix_cache_hit_tokens",
                                   "Prompt tokens served by the prefix cache",
                                   list(lbl), registry=r).labels(**lbl)
        self.finished = Counter("stagger_request_success", "Finished requests by finish reason",
                                list(lbl) + ["finished_reason"], registry=r)

    def observe_finished(self, out, reason: str) -> None:
        m = out.metrics
        if m is not None:
            if m.ttft is not None:
                self.ttft.observe(m.ttft)
            t = m.token_times
            for a, b in zip(t, t[1:]):
                self.itl.observe(b - a)
            if m.finish_time is not None:
                self.e2e.observe(m.finish_time - m.arrival_time)
            if m.queue_time is not None:
                self.queue.observe(m.queue_time)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.prefix_hits.inc(out.num_cached_tokens)
        reason = "error" if reason and reason.startswith("error") else reason
        self.finished.labels(finished_reason=reason, **self._lbl).inc()

    def observe_step(self, rec) -> None:
        if sum(rec.tokens_per_rank) == 0:
            return   # idle steps say nothing about balance
        self.step_time.observe(rec.step_time_s)
        self.imbalance.set(rec.imbalance)
        self.imbalance_hist.observe(rec.imbalance)

    def observe_loads(self, loads, buffered: int) -> None:
        self.running.set(sum(ld.num_running for ld in loads))
        self.waiting.set(sum(ld.num_waiting for ld in loads))
        self.buffered.set(buffered)
        for ld in loads:
            self.kv.labels(rank=str(ld.rank), **self._lbl).set(ld.kv_usage)
            self.kv_free.labels(rank=str(ld.rank), **self._lbl).set(ld.free_kv_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
