"""bench/serving.py --url: replay a workload against any OpenAI-compatible server.

Each request is sent at its arrival time to POST /v1/completions (token-id prompt, greedy,
ignore_eos, stream with include_usage); TTFT, TPOT and end-to-end latency are taken at the client
(TTFT: send -> first chunk carrying text or the finish; TPOT: (finish - first) / (tokens - 1) with
the token count from `usage`). The outcome has the shape bench/serving.Run summarizes, so the same
table, results.json and plots come out; server-side figures (imbalance, buffer time) are left
empty because a client cannot see them; against this project's server the engine-side mean TTFT
(from its /metrics) is added as server_ttft_mean_s, which splits the HTTP cost from the engine's.
"""
import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class ClientMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_tokens: int = 0
    token_times: list = field(default_factory=list)
    queue_time = None   # the server's buffer time is not visible from here

    @property
    def ttft(self):
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self):
        if self.finish_time is None or self.num_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_tokens - 1)

    @property
    def e2e(self):
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class ClientOutput:
    request_id: str
    prompt_token_ids: list
    token_ids: list = field(default_factory=list)   # placeholders: only the count is known
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    metrics: ClientMetrics | None = None
    error: str | None = None


async def _one(client, url, model, k, spec, t0) -> ClientOutput:
    await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.time()))
    m = ClientMetrics(arrival_time=time.time())
    out = ClientOutput(f"r{k}", spec.prompt_token_ids, metrics=m)
    body = {"model": model, "prompt": spec.prompt_token_ids, "max_tokens": spec.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if spec.session_id is not None:
        body["user"] = str(spec.session_id)
    if spec.priority:
        body["priority"] = spec.priority
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.time()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message")
                    break
                for ch in chunk.get("choices") or []:
                    if m.first_token_time is None and (ch.get("text") or ch.get("finish_reason")):
                        m.first_token_time = now
                    m.token_times.append(now)
                    if ch.get("finish_reason"):
                        out.finish_reason, m.finish_time = ch["finish_reason"], now
                if chunk.get("usage"):
                    u = chunk["usage"]
                    m.num_tokens = u.get("completion_tokens", 0)
                    out.token_ids = [0] * m.num_tokens
                    out.num_cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except Exception as e:   # a failed request is counted, not fatal
        out.error = repr(e)
    if out.error is not None:
        out.finish_reason = None
    return out


async def _replay(url, specs, api_key, model):
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=None, headers=headers, limits=limits) as client:
        if model is None:
            r = await client.get(url + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        before = await _server_ttft(client, url)
        t0 = time.time() + 0.2
        outs = await asyncio.gather(*(_one(client, url, model, k, s, t0) for k, s in enumerate(specs)))
        after = await _server_ttft(client, url)
    server = None
    if before and after and after[1] > before[1]:
        server = (after[0] - before[0]) / (after[1] - before[1])
    return list(outs), t0, server


async def _server_ttft(client, url):
    """(sum, count) of this project's server-side TTFT histogram (engine clock), if it has one."""
    try:
        r = await client.get(url + "/metrics")
        if r.status_code != 200:
            return None
        from prometheus_client.parser import text_string_to_metric_families
        vals = {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
                if s.name.startswith("stagger_time_to_first_token_seconds_")}
        name = "stagger_time_to_first_token_seconds"
        return vals.get(name + "_sum"), vals.get(name + "_count")
    except Exception:
        return None


def replay(url: str, specs, *, api_key=None, model=None):
    """-> bench.serving.Run over the client-side outputs (failed requests count as failed)."""
    from bench.serving import Run
    outs, t0, server_ttft = asyncio.run(_replay(url.rstrip("/"), specs, api_key, model))
    errors = [o.error for o in outs if o.error]
    if errors:
        print(f"{url}: {len(errors)} request(s) failed, first: {errors[0]}")
    run = Run(outs, [], t0)
    run.server_ttft_mean_s = server_ttft   # the engine's own clock, from the server's /metrics
    return run
