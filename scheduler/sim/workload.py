"""Workloads for the simulator: request specs with arrival times (seconds from 0).

Arrivals: poisson, bursty (gamma renewal with a coefficient of variation > 1), a JSONL requests file
(arrival_s, prompt_len or prompt_token_ids, max_tokens), or the Azure LLM 2023 trace replayed at its
own spacing compressed to a target rate. Lengths: fixed, lognormal, or drawn from the trace.
Everything is seeded: the same arguments give the same workload.
"""
import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime


@dataclass
class RequestSpec:
    arrival_s: float
    prompt_len: int
    max_tokens: int
    prompt_token_ids: list[int] | None = None
    priority: int = 0
    session_id: str | None = None


def read_trace(path: str) -> list[tuple[float, int, int]]:
    """(arrival seconds from the first row, prompt tokens, generated tokens) per row."""
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            ts = r["TIMESTAMP"]
            head, _, frac = ts.partition(".")
            t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + (frac or "0"))
            rows.append((t, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    return [(t - t0, p, g) for t, p, g in rows]


def trace_workload(path: str, *, rate: float | None = None, speedup: float | None = None,
                   start_s: float = 0.0, duration: float | None = None, max_prompt: int | None = None,
                   max_output: int | None = None, length_scale: float = 1.0) -> list[RequestSpec]:
    """Replay the trace from `start_s` (trace seconds) with time compressed by `speedup`, or by
    whatever factor makes the mean rate `rate` req/s; `duration` is in replayed seconds. Lengths are
    scaled by `length_scale` and clipped to max_prompt / max_output."""
    rows = [r for r in read_trace(path) if r[0] >= start_s]
    if not rows:
        raise ValueError(f"{path}: no rows after {start_s} s")
    if rate is not None:
        span = rows[-1][0] - rows[0][0]
        speedup = rate * span / max(1, len(rows) - 1)
    speedup = speedup or 1.0
    out = []
    for t, p, g in rows:
        a = (t - rows[0][0]) / speedup
        if duration is not None and a > duration:
            break
        p = max(1, round(p * length_scale))
        g = max(1, round(g * length_scale))
        out.append(RequestSpec(a, min(p, max_prompt or p), min(g, max_output or g)))
    return out


def multi_turn(specs: list[RequestSpec], rng: random.Random, new_token, *, sessions: int, prefixes: int,
               prefix_len: int, max_prompt: int, answer_token: int = 1) -> list[RequestSpec]:
    """Turn `specs` (arrival, user-message length, answer length) into chat conversations, in place.

    Each request belongs to one of `sessions` clients, picked at random; a conversation opens with one
    of `prefixes` shared system prompts of `prefix_len` tokens, and every turn's prompt is the
    conversation so far plus a new user message, so a session's next prompt starts with its previous
    one (the prefix cache can serve it). The answer joins the history as `max_tokens` copies of
    `answer_token` (what the engine generates differs, so the cache match stops at the previous
    prompt). A conversation that would pass `max_prompt` starts over. `new_token()` draws fresh ids.
    """
    if sessions < 1 or prefixes < 1 or prefix_len < 0:
        raise ValueError("sessions and prefixes must be >= 1, prefix_len >= 0")
    systems = [[new_token() for _ in range(prefix_len)] for _ in range(prefixes)]
    convs: dict[int, list[int]] = {}
    for s in specs:
        sid = rng.randrange(sessions)
        user = [new_token() for _ in range(s.prompt_len)]
        conv = convs.get(sid)
        if conv is None or len(conv) + len(user) > max_prompt:
            conv = list(systems[rng.randrange(prefixes)])
        prompt = (conv + user)[:max_prompt]
        s.prompt_token_ids, s.prompt_len, s.session_id = prompt, len(prompt), f"s{sid}"
        convs[sid] = prompt + [answer_token] * s.max_tokens
    return specs


def load_requests(path: str) -> list[RequestSpec]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = json.loads(line)
            ids = d.get("prompt_token_ids")
            if ids is None and "prompt_len" not in d:
                raise ValueError(f"{path}:{i + 1}: needs prompt_len or prompt_token_ids")
            out.append(RequestSpec(float(d.get("arrival_s", 0.0)), len(ids) if ids else int(d["prompt_len"]),
                                   int(d.get("max_tokens", 16)), ids, int(d.get("priority", 0)),
                                   d.get("session_id")))
    out.sort(key=lambda s: s.arrival_s)
    return out


def length_sampler(kind: str, rng: random.Random, prompt_mean: float = 1024, output_mean: float = 256,
                   sigma: float = 1.0, trace: str | None = None, max_prompt: int = 16384,
                   max_output: int = 4096,
                   prompt_sigma: float | None = None, output_sigma: float | None = None):
    """Returns a function () -> (prompt_len, max_tokens). kind: fixed | lognormal | trace.
    lognormal: prompt and output lengths are independent lognormals with the given means (before
    clipping) and their own spreads (`prompt_sigma`, `output_sigma`; default `sigma` for both).
    E.g. prompt mean 2048 with sigma 0.6 has median 1711 and P99 about 6.9k."""
    if kind == "fixed":
        return lambda: (int(prompt_mean), int(output_mean))
    if kind == "lognormal":
        sp = sigma if prompt_sigma is None else prompt_sigma
        so = sigma if output_sigma is None else output_sigma
        if prompt_mean <= 0 or output_mean <= 0 or sp < 0 or so < 0:
            raise ValueError("lognormal lengths need positive means and non-negative sigmas")
        mu_p, mu_o = math.log(prompt_mean) - sp ** 2 / 2, math.log(output_mean) - so ** 2 / 2
        return lambda: (min(max_prompt, max(1, round(rng.lognormvariate(mu_p, sp)))),
                        min(max_output, max(1, round(rng.lognormvariate(mu_o, so)))))
    if kind == "trace":
        pairs = [(min(max_prompt, p), min(max_output, g)) for _, p, g in read_trace(trace)]
        return lambda: pairs[rng.randrange(len(pairs))]
    raise ValueError(f"unknown length distribution {kind!r}: fixed, lognormal or trace")


def synthetic(rate: float, duration: float, lengths, rng: random.Random, arrival: str = "poisson",
              cv: float = 3.0) -> list[RequestSpec]:
    """Open-loop arrivals at mean `rate` req/s over `duration` s. bursty: gamma inter-arrival
    times with coefficient of variation `cv` (cv=1 is Poisson; larger means burstier)."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if arrival not in ("poisson", "bursty"):
        raise ValueError(f"unknown arrival process {arrival!r}: poisson or bursty")
    shape = 1.0 if arrival == "poisson" else 1.0 / cv ** 2
    out, t = [], 0.0
    while True:
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
        if t > duration:
            return out
        p, g = lengths()
        out.append(RequestSpec(t, p, g))
