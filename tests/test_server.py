"""The OpenAI-compatible server against the official openai client, on loopback, live.

Most tests run uvicorn on a thread of this process (the engine is built once per module); the
torchrun and SIGTERM tests start `python -m launch.serve` as a subprocess. Every wait is bounded.
"""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import jinja2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from launch.make_checkpoint import make_checkpoint
from launch.serve import build_server, finish, parse_args
from launch.server_protocol import ApiError, ChatTemplate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
PROMPTS = ["Hello world", "The quick brown fox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("served"))
    make_checkpoint(d, "tiny-v3")   # writes a DeepSeek-style chat template and its special tokens
    return d


@pytest.fixture(scope="module")
def ref(ckpt):
    return LLM(ckpt, kv_block_size=16)


@contextlib.contextmanager
def live(llm, ckpt, *flags):
    port = free_port()
    a = parse_args(["--model", ckpt, "--port", str(port), "--served-model-name", "tiny", *flags])
    server, st, thread = build_server(llm, a, install_signals=False)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", st
    finally:
        server.should_exit = True
        t.join(timeout=20)
        finish(st, thread, 20)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def srv(ckpt):
    with live(LLM(ckpt, kv_block_size=16), ckpt) as s:
        yield s


def client(url, key="none", cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key=key, timeout=60, max_retries=0)


def ref_text(ref, prompt, **kw):
    sp = SamplingParams(**{"temperature": 0, "max_tokens": 8, "ignore_eos": True, **kw})
    return ref.generate([prompt], sp)[0]


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def render(ckpt, messages):
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        tc = json.load(f)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tc["chat_template"]).render(messages=messages, add_generation_prompt=True,
                                                       bos_token=tc["bos_token"], eos_token=tc["eos_token"])


# ---- wire format ----------------------------------------------------------------------------------
def test_completions_and_chat_match_generate(srv, ref, ckpt):
    url, _ = srv
    c = client(url)
    for p in PROMPTS:
        want = ref_text(ref, p)
        r = c.completions.create(model="tiny", prompt=p, **GREEDY)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 8)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 8
        chunks = list(c.completions.create(model="tiny", prompt=p, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = ref_text(ref, render(ckpt, msgs))
    r = c.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == want.text
    assert chunks[-1].usage.total_tokens == len(want.prompt_token_ids) + 8
    # token-id prompts, several at once; max_completion_tokens for chat
    r = c.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], **GREEDY)
    assert [ch.text for ch in sorted(r.choices, key=lambda x: x.index)] == \
        [ref_text(ref, [5, 6, 7]).text, ref_text(ref, [8, 9]).text]
    assert r.usage.prompt_tokens == 5
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_n_seeds_and_stop_strings(srv, ref):
    url, _ = srv
    c = client(url)
    kw = dict(model="tiny", prompt="Once upon", n=3, temperature=1.0, seed=7, max_tokens=10,
              extra_body={"ignore_eos": True, "top_k": 50})
    a = sorted(c.completions.create(**kw).choices, key=lambda x: x.index)
    b = sorted(c.completions.create(**kw).choices, key=lambda x: x.index)
    assert [x.index for x in a] == [0, 1, 2]
    assert [x.text for x in a] == [x.text for x in b]   # seeded: reproducible
    for j, x in enumerate(a):   # choice j draws with seed + j
        assert x.text == ref_text(ref, "Once upon", temperature=1.0, seed=7 + j, max_tokens=10, top_k=50).text
    assert len({x.text for x in a}) > 1
    free = ref_text(ref, "The quick brown", max_tokens=24).text
    stop = free[len(free) // 2:][:2]
    r = c.completions.create(model="tiny", prompt="The quick brown", temperature=0, max_tokens=24,
                             stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[:free.index(stop)]
    chunks = list(c.completions.create(model="tiny", prompt="The quick brown", temperature=0, max_tokens=24,
                                       stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == free[:free.index(stop)]


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(srv, ref, tmp_path):
    url, _ = srv

    def post(path, body):
        raw = body if isinstance(body, bytes) else json.dumps(body)
        return httpx.post(url + path, content=raw, timeout=30)

    cases = [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"prompt": "hi", "max_tokens": "x"}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": "hi", "stop": [""]}, 400, "stop"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [10 ** 9]}, 400, "prompt"),
        ({"prompt": list(range(3, 3000))}, 400, "max_tokens"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        # OpenAI fields the engine does not implement: refused, never silently ignored
        ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
        ({"prompt": "hi", "echo": True}, 400, "echo"),
        ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ]
    for body, status, param in cases:
        r = post("/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
    chats = (({"messages": "hi"}, "messages"), ({"messages": [{"content": "x"}]}, "messages"),
             ({"messages": [{"role": "user", "content": "x"}], "stream_options": 3}, "stream_options"),
             ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"))
    for body, param in chats:
        r = post("/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.get(url + "/nope").status_code == 404
    assert "error" in httpx.get(url + "/nope").json()
    # no chat template in the checkpoint: a clear 400
    with pytest.raises(ApiError, match="no chat template") as e:
        ChatTemplate(str(tmp_path)).render([{"role": "user", "content": "x"}])
    assert e.value.status == 400
    # unknown fields are ignored; the server still answers right
    r = post("/v1/completions", {"prompt": "Hello world", "temperature": 0, "max_tokens": 8,
                                 "ignore_eos": True, "frobnicate": {"x": 1}, "logit_bias": {}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref_text(ref, "Hello world").text
    # the small endpoints
    ids = post("/tokenize", {"prompt": "Hello world"}).json()
    assert ids["tokens"] == ref.tokenizer.encode("Hello world") and ids["count"] == len(ids["tokens"])
    assert post("/detokenize", {"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    assert post("/detokenize", {"tokens": ["a"]}).status_code == 400
    m = httpx.get(url + "/v1/models").json()["data"][0]
    assert m["id"] == "tiny" and m["object"] == "model" and m["max_model_len"] > 0 and "owned_by" in m
    assert httpx.get(url + "/version").json()["version"]
    assert httpx.get(url + "/health").status_code == 200


def test_api_key_and_max_pending(ckpt, ref):
    with live(LLM(ckpt, kv_block_size=16), ckpt, "--api-key", "sekrit", "--max-pending", "2") as (url, st):
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/version"):
            r = httpx.get(url + path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        r = client(url, "sekrit").completions.create(model="tiny", prompt=PROMPTS[0], **GREEDY)
        assert r.choices[0].text == ref_text(ref, PROMPTS[0]).text
        with pytest.raises(openai.APIStatusError) as e:   # 3 choices > --max-pending 2
            client(url, "sekrit").completions.create(model="tiny", prompt="hi", n=3, max_tokens=2)
        assert e.value.status_code == 503


# ---- load -------------------------------------------------------------------------------------------
def test_256_streams_with_preemption_each_complete_once_with_generate_tokens(ckpt, ref):
    prompts = [[(7 * i + k) % 400 + 3 for k in range(14)] for i in range(256)]   # 14 + 4 > one 16-block
    want = ref.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm = LLM(ckpt, kv_block_size=16, num_kv_blocks=8, max_num_seqs=8)

    async def one(c, p):
        texts, finishes, usage = [], [], None
        stream = await c.completions.create(
            model="tiny", prompt=p, temperature=0, max_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            for x in ch.choices:
                texts.append(x.text)
                if x.finish_reason:
                    finishes.append(x.finish_reason)
        return "".join(texts), finishes, usage

    async def run(url):
        c = client(url, cls=openai.AsyncOpenAI)
        return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in prompts)), 120)

    with live(llm, ckpt) as (url, st):
        got = asyncio.run(run(url))
    assert llm.engine.worker.num_preempted > 0
    for (text, finishes, usage), w in zip(got, want):
        assert finishes == ["length"] and text == w.text and usage.completion_tokens == 4


def test_disconnects_abort_and_give_blocks_back(srv, ref):
    url, st = srv

    async def leave(c):
        async with c.stream("POST", url + "/v1/completions", json={
                "prompt": "Hello world", "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= 2:
                    return True   # leaving the block closes the connection mid-stream

    async def stay(c, p):
        r = await c.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0,
                                                        "ignore_eos": True})
        return r.json()["choices"][0]["text"]

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(
                *(leave(c) for _ in range(50)), *(stay(c, p) for p in PROMPTS)), 120)

    aborted0 = metrics(url).get(("stagger_request_success_total", (("finished_reason", "abort"),)), 0)
    got = asyncio.run(run())
    assert got[:50] == [True] * 50
    assert got[50:] == [ref_text(ref, p).text for p in PROMPTS]
    deadline = time.time() + 20
    while True:   # the aborts land at the next step boundary; loads are read every half second
        m = metrics(url)
        aborted = m.get(("stagger_request_success_total", (("finished_reason", "abort"),)), 0) - aborted0
        used = [v for (name, _), v in m.items() if name == "stagger_kv_cache_usage_perc"]
        if aborted == 50 and used and max(used) == 0 and m[("stagger_num_requests_running", ())] == 0:
            break
        assert time.time() < deadline, (aborted, used)
        time.sleep(0.2)
    assert not st.loop.live
    bm = st.llm.engine.worker.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    m = metrics(url)
    assert m[("stagger_time_to_first_token_seconds_count", ())] >= 52
    assert m[("stagger_generation_tokens_total", ())] > 0


# ---- processes ----------------------------------------------------------------------------------------
def _spawn(cmd, port, wait=True):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    log = tempfile.TemporaryFile()   # not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)
    proc.log = log
    if wait:
        _wait_healthy(proc, port)
    return proc


def _tail(proc) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")[-3000:]


def _wait_healthy(proc, port):
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"server did not come up: {_tail(proc)}")
        time.sleep(0.2)


def _rank0_pid(proc) -> int:
    """torchrun's worker with RANK=0 (a signal to it is what an operator's SIGTERM becomes)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().split(")")[1].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == proc.pid and b"RANK=0" in env:
            return int(pid)
    raise AssertionError("no rank-0 worker found")


def _stop(proc, pid=None, bound=45):
    os.kill(pid or proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=bound)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _load_then_sigterm(url, pid):
    """12 streams (4 short, 8 far longer than the grace period); SIGTERM once all have begun.
    -> each stream's events, in order."""
    async def one(c, max_tokens, started):
        events = []
        async with c.stream("POST", url + "/v1/completions", json={
                "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        return events

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            started = [asyncio.Event() for _ in range(12)]
            tasks = [asyncio.ensure_future(one(c, 3 if i < 4 else 1500, started[i])) for i in range(12)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            os.kill(pid, signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return asyncio.run(run())


def test_torchrun_two_ranks_and_two_instances_same_texts_and_sigterm_under_load(ckpt, ref):
    """Rank 0 serves, both ranks step; the texts equal one process's. SIGTERM to rank 0 under load:
    short requests finish inside the grace period, long ones end with a clean error, every rank
    exits 0 within a bound."""
    want = [ref_text(ref, p).text for p in PROMPTS]
    procs = []   # both come up at once: their start-ups overlap

    def launch(extra):
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "launch.serve", "--model", ckpt, "--port", str(port),
               "--kv-block-size", "16", "--grace-period", "1.5", *extra]
        procs.append(_spawn(cmd, port, wait=False))
        return port

    runs = [(extra, launch(extra)) for extra in ([], ["--instances", "2"])]
    try:
        for (extra, port), proc in zip(runs, procs):
            _wait_healthy(proc, port)
            url = f"http://127.0.0.1:{port}"
            c = client(url)
            got = [c.completions.create(model=ckpt, prompt=p, **GREEDY).choices[0].text for p in PROMPTS]
            chunks = c.completions.create(model=ckpt, prompt=PROMPTS[1], stream=True, **GREEDY)
            streamed = "".join(ch.choices[0].text for ch in chunks)
            assert got == want and streamed == want[1], extra
            if extra:
                rc = _stop(proc, _rank0_pid(proc))
            else:
                results = _load_then_sigterm(url, _rank0_pid(proc))
                rc = proc.wait(timeout=45)
            assert rc == 0, _tail(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for i, events in enumerate(results):
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        if i < 4:   # short ones finished inside the grace period
            assert last["choices"][0]["finish_reason"] == "length"
        else:       # long ones were cut at its end with a clean error (or, on a fast machine, done)
            assert "error" in last and last["error"]["code"] == 503 or \
                last["choices"][0]["finish_reason"] == "length"
    assert any("error" in json.loads(ev[-2]) for ev in results[4:])


def test_bench_serving_url_mode_replays_through_the_server(srv, ckpt):
    """bench/serving.py --url: the workload through HTTP, client-side timings, the same summary."""
    from bench.serving import main
    url, _ = srv
    res = main(["--model", ckpt, "--url", f"http={url}", "--rate", "20", "--duration", "0.5",
                "--prompt-len", "8", "--output-len", "3", "--max-prompt", "16", "--max-output", "4"])["http"]
    assert res["completed"] >= 1 and res["failed"] == 0
    assert res["ttft_mean_s"] > 0 and res["server_ttft_mean_s"] > 0 and res["throughput_tok_s"] > 0


# ---- the HTTP front end of a global scheduler service, instances as jobs of their own ---------------
def _front_end(ckpt, port, env):
    """launch.serve --scheduler-listen: -> (process, the scheduler's HOST:PORT from its stdout)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--model", ckpt, "--port", str(port),
                             "--served-model-name", "tiny", "--scheduler-listen", "127.0.0.1:0",
                             "--kv-block-size", "16", "--dead-after-s", "5", "--grace-period", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    proc.log = log
    found = []

    def read():   # keep draining stdout (a full pipe would block the server)
        for line in proc.stdout:
            if line.startswith("stagger scheduler listening on") and not found:
                found.append(line.split()[-1])
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 60
    while not found:
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no listen address: {_tail(proc)}")
        time.sleep(0.05)
    return proc, found[0]


def test_front_end_of_scheduler_service_two_instance_jobs_one_killed(ckpt, ref):
    """HTTP in front of two launch.instance jobs: texts equal one in-process engine's; one instance
    SIGKILLed mid-run: every request ends once, with the reference text or (streaming, tokens already
    sent) with the instance_lost error; the survivor keeps serving; SIGTERM: all exit 0."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               STAGGER_SECRET="front-end-test-" + os.urandom(8).hex())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prompts = [f"Request {i}: the quick brown fox" for i in range(8)]   # the first 4 stream
    lengths = [96] * 4 + [32] * 4
    want = [ref_text(ref, p, max_tokens=n).text for p, n in zip(prompts, lengths)]
    procs = []
    try:
        front, addr = _front_end(ckpt, port, env)
        procs.append(front)
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and front.poll() is None, _tail(front)
                time.sleep(0.1)
        assert r.status_code == 503 and "no instance" in r.text   # nobody to run requests yet
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "timeout": 0.3},
                       timeout=30)   # held in the buffer; its abort finishes without any instance
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout", r.text
        for _ in range(2):
            cmd = [sys.executable, "-m", "launch.instance", "--scheduler", addr, "--model", ckpt,
                   "-o", "kv_block_size=16", "-o", "max_num_seqs=2"]
            log = tempfile.TemporaryFile()
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            p.log = log
            procs.append(p)
        victim = procs[2]
        deadline = time.time() + 90
        while metrics(url).get(("stagger_num_instances", ())) != 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                "\n".join(_tail(p) for p in procs)
            time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200

        async def one(c, i, started):
            body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "ignore_eos": True}
            if i >= 4:
                r = await c.post(url + "/v1/completions", json=body)
                return r.status_code, r.json()
            events = []
            async with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if events[-1] != "[DONE]" and "choices" in json.loads(events[-1]):
                            started.add(i)
            return r.status_code, events

        async def run():
            started = set()
            async with httpx.AsyncClient(timeout=60) as c:
                tasks = [asyncio.ensure_future(one(c, i, started)) for i in range(len(prompts))]
                while len(started) < 3:   # 3 streams run: at most 2 on one instance (max_num_seqs)
                    assert not any(t.done() for t in tasks[:4]), _tail(front)
                    await asyncio.sleep(0.005)
                victim.send_signal(signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*tasks), 90)

        got = asyncio.run(run())
        assert victim.wait(timeout=10) == -signal.SIGKILL
        lost = []
        for i, (status, res) in enumerate(got):
            assert status == 200, (i, res)
            if i >= 4:   # non-streaming: a lost instance's request restarts elsewhere, unnoticed
                assert res["choices"][0]["text"] == want[i] and res["choices"][0]["finish_reason"] == "length"
                continue
            assert res[-1] == "[DONE]" and res.count("[DONE]") == 1
            chunks = [json.loads(e) for e in res[:-1]]
            ends = [ch for ch in chunks if "error" in ch or ch["choices"][0]["finish_reason"]]
            assert len(ends) == 1 and ends[0] is chunks[-1], (i, chunks)   # exactly one end, the last
            text = "".join(ch["choices"][0]["text"] for ch in chunks if "choices" in ch)
            if "error" in ends[0]:
                assert ends[0]["error"]["code"] == "instance_lost", ends[0]
                assert text == want[i][:len(text)]    # what was streamed was right, up to the loss
                lost.append(i)
            else:
                assert ends[0]["choices"][0]["finish_reason"] == "length" and text == want[i], i
        assert lost   # the kill did hit streaming work

        # the survivor keeps serving; /health stays ok with one instance
        c = client(url)
        r = c.completions.create(model="tiny", prompt=prompts[4], temperature=0, max_tokens=32,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == want[4]
        chunks = list(c.completions.create(model="tiny", prompt=prompts[0], stream=True, temperature=0,
                                           max_tokens=96, extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks) == want[0]
        assert httpx.get(url + "/health").status_code == 200
        assert metrics(url)[("stagger_num_instances", ())] == 1
        # a client that leaves mid-stream aborts its request on the instance
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
            n = sum(1 for line, _ in zip(r.iter_lines(), range(3)) if line.startswith("data: "))
        assert n >= 1
        deadline = time.time() + 20
        while metrics(url).get(("stagger_request_success_total", (("finished_reason", "abort"),))) != 1:
            assert time.time() < deadline, "the disconnect did not abort"
            time.sleep(0.1)
        # SIGTERM drains the front end, which tells the instance to stop: both exit 0
        assert _stop(front, bound=30) == 0, _tail(front)
        assert procs[1].wait(timeout=30) == 0, _tail(procs[1])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
