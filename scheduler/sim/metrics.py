"""Per-request and per-step metrics of a simulation run.

Per request: TTFT (first token - arrival), TPOT ((finish - first token) / (outputs - 1)), end-to-end,
and time held before release to a rank. Per step of an instance: tokens per rank, imbalance
(max / mean tokens over its ranks, steps with work only; imbalance_weighted = sum of per-step max
over sum of per-step mean, i.e. weighted by work), idle-rank fraction (ranks with no token),
and busy time per rank; utilization = sum of rank busy time / (ranks x span), span running from the
first arrival to the end of the run; step_utilization = busy time / (ranks x time in steps), i.e.
one minus the share of stepping time lost to parallelization bubbles. Steps of prefill instances (pd)
and of colocated instances are the "main" steps; pd decode steps are reported under decode_*.
"""
from scheduler.allocation import quantile


def percentile(xs: list[float], p: float) -> float:
    return quantile(xs, p / 100) if xs else float("nan")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


class _StepStats:
    def __init__(self):
        self.steps = self.busy_steps = 0
        self.time = self.busy = self.rank_time = 0.0
        self.ranks = self.idle_ranks = 0
        self.imbalance_sum = 0.0
        self.max_tokens = self.mean_tokens = 0.0   # sums over steps, for the token-weighted imbalance
        self.num_ranks = 0   # ranks of this role (for utilization)


class Recorder:
    def __init__(self):
        self.arrivals = 0
        self.first_arrival = None
        self.requests = []          # (arrival, release, first_token, finish, prompt, outputs, reason, id)
        self.generated = 0          # output tokens sampled (all steps that completed)
        self.prefilled = 0          # prompt tokens of requests that got a first token
        self.stats = {"main": _StepStats(), "decode": _StepStats()}
        self.series = []            # (time, imbalance, step_time) of main steps, for plots
        self.end = 0.0

    def arrived(self, req) -> None:
        self.arrivals += 1
        if self.first_arrival is None:
            self.first_arrival = req.arrival_time

    def done(self, req) -> None:
        self.requests.append((req.arrival_time, req.release_time, req.first_token_time, req.finish_time,
                              req.num_prompt_tokens, req.num_output_tokens, req.finish_reason,
                              req.request_id))
        req.prompt_token_ids, req.output_token_ids = [], []   # the simulator keeps no token ids around

    def step(self, inst, start, t, works, busy, generated) -> None:
        st = self.stats["decode" if inst.role == "decode" else "main"]
        tokens = [w.tokens for w in works]
        st.steps += 1
        st.time += t
        st.rank_time += t * len(works)
        st.busy += sum(busy)
        st.ranks += len(tokens)
        st.idle_ranks += sum(1 for x in tokens if x == 0)
        total = sum(tokens)
        if total:
            imb = max(tokens) * len(tokens) / total
            st.busy_steps += 1
            st.imbalance_sum += imb
            st.max_tokens += max(tokens)
            st.mean_tokens += total / len(tokens)
            if inst.role != "decode":
                self.series.append((start, imb, t))
        self.generated += generated
        if inst.role != "decode":
            self.prefilled += sum(w.prefill_tokens for w in works)

    def finish(self, end: float, sim) -> None:
        self.end = end
        for inst in sim.instances:
            self.stats["decode" if inst.role == "decode" else "main"].num_ranks += len(inst.ranks)

    # ---- summary -----------------------------------------------------------------------------
    def summary(self) -> dict:
        ok = [r for r in self.requests if not (r[6] or "").startswith("error")]
        ttft = [r[2] - r[0] for r in ok if r[2] is not None]
        tpot = [(r[3] - r[2]) / (r[5] - 1) for r in ok if r[5] > 1 and r[2] is not None]
        e2e = [r[3] - r[0] for r in ok]
        hold = [r[1] - r[0] for r in ok if r[1] is not None]
        span = max(1e-9, self.end - (self.first_arrival or 0.0))
        out = {
            "ttft_mean_s": _mean(ttft), "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "tpot_mean_s": _mean(tpot), "e2e_mean_s": _mean(e2e), "hold_mean_s": _mean(hold),
            "throughput_tok_s": self.generated / span, "prompt_tok_s": self.prefilled / span,
            "completed": len(ok), "arrived": self.arrivals, "errors": len(self.requests) - len(ok),
            "span_s": span,
        }
        for key, prefix in (("main", ""), ("decode", "decode_")):
            st = self.stats[key]
            if not st.num_ranks:
                continue
            out[prefix + "imbalance_mean"] = (st.imbalance_sum / st.busy_steps if st.busy_steps
                                              else float("nan"))
            out[prefix + "imbalance_weighted"] = (st.max_tokens / st.mean_tokens if st.mean_tokens
                                                  else float("nan"))
            out[prefix + "idle_fraction"] = st.idle_ranks / st.ranks if st.ranks else float("nan")
            out[prefix + "utilization"] = st.busy / (st.num_ranks * span)
            out[prefix + "step_utilization"] = st.busy / st.rank_time if st.rank_time else float("nan")
            out[prefix + "step_time_mean_s"] = st.time / st.steps if st.steps else float("nan")
            out[prefix + "steps"] = st.steps
        return out
