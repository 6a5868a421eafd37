"""Instances as separate jobs behind one global scheduler service (launch.scheduler, launch.instance).

Three one-rank instances, each its own process; one is SIGKILLed mid-run. Every request ends exactly
once: with the tokens of a single-instance run, or (only if a client had already seen its tokens) with
"error: instance lost". A fourth instance then joins, the others drain and leave, and it serves alone.
"""
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from engine.instances import SchedulerClient
from engine.sampling import SamplingParams
from reference import make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "jobs-test-secret-" + os.urandom(8).hex()
OPTS = ["-o", "kv_block_size=16", "-o", "num_kv_blocks=64", "-o", "max_num_seqs=2",
        "-o", "max_num_batched_tokens=64"]
PROMPTS = [[5 + i, 6, 7 + 3 * i] + list(range(20, 20 + 4 * i)) for i in range(12)]
MAX_TOKENS = 24


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT, STAGGER_SECRET=SECRET)


def _spawn(args):
    return subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _read_line(proc, prefix, timeout=60):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line; output:\n{''.join(seen)[-3000:]}")


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    make_hf_checkpoint(d, {"n_routed_experts": 8, "n_group": 4})
    from engine import LLM   # the tokens of a single-instance run, in this process
    llm = LLM(str(d), kv_block_size=16, num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return str(d), [o.token_ids for o in outs]


def test_three_instances_one_killed_then_one_joins(ckpt):
    model, ref = ckpt
    procs = []
    try:
        sched = _spawn(["launch.scheduler", "--listen", "127.0.0.1:0", "--model", model,
                        "--kv-block-size", "16", "--dead-after", "5"])
        procs.append(sched)
        addr = _read_line(sched, "stagger scheduler listening on").rsplit(" ", 1)[1]
        inst = []
        for i in range(3):   # one after the other, so instance i gets scheduler rank i
            p = _spawn(["launch.instance", "--scheduler", addr, "--model", model] + OPTS)
            procs.append(p)
            assert _read_line(p, "stagger instance").endswith(f"ranks [{i}]")
            inst.append(p)
        client = SchedulerClient(tuple([addr.rsplit(":", 1)[0], int(addr.rsplit(":", 1)[1])]),
                                 SECRET.encode())
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for i, p in enumerate(PROMPTS):   # even ids stream every token, odd ones only the result
            client.submit(p, params, request_id=f"r{i}", stream=i % 2 == 0)
        finals, streamed, seen_on = defaultdict(list), defaultdict(list), defaultdict(set)
        killed, before_kill = False, set()
        deadline = time.time() + 90
        while len(finals) < len(PROMPTS) and time.time() < deadline:
            out = client.next_output(timeout=60)
            streamed[out.request_id] += out.new_token_ids
            if out.new_token_ids:
                seen_on[out.request_id].add(out.metrics.rank)
            if out.finished:
                finals[out.request_id].append(out)
                if not killed:
                    before_kill.add(out.request_id)
            elif not killed and out.metrics.rank == 1 and out.new_token_ids:
                inst[1].send_signal(signal.SIGKILL)   # instance 1 vanishes mid-run
                killed = True
        assert killed
        assert sorted(finals) == sorted(f"r{i}" for i in range(len(PROMPTS)))
        assert all(len(v) == 1 for v in finals.values())          # exactly once
        errors = []
        for i in range(len(PROMPTS)):
            out = finals[f"r{i}"][0]
            if out.finish_reason == "error: instance lost":
                errors.append(i)
                assert i % 2 == 0 and 1 in seen_on[f"r{i}"]        # only after a client saw its tokens
            else:
                assert out.finish_reason == "length" and out.token_ids == ref[i], i
                if f"r{i}" not in before_kill:                     # (instance 1 may finish one first)
                    assert out.metrics.rank in (0, 2)              # finished by a survivor
                if i % 2 == 0:
                    assert streamed[f"r{i}"] == ref[i]             # the stream matches the result
        assert errors                                             # the kill did hit streaming work
        assert inst[1].wait(timeout=10) == -signal.SIGKILL

        # a fourth instance joins; the two survivors drain and leave; new work goes to the newcomer
        p = _spawn(["launch.instance", "--scheduler", addr, "--model", model] + OPTS)
        procs.append(p)
        assert _read_line(p, "stagger instance").endswith("ranks [3]")
        for q in (inst[0], inst[2]):
            q.send_signal(signal.SIGTERM)
        for q in (inst[0], inst[2]):
            assert q.wait(timeout=30) == 0
        for i in range(4):
            client.submit(PROMPTS[i], params, request_id=f"late{i}")
        late = [client.next_output(timeout=60) for _ in range(4)]
        for out in late:
            i = int(out.request_id[4:])
            assert out.finish_reason == "length" and out.token_ids == ref[i] and out.metrics.rank == 3
        client.close()
    finally:
        _kill_all(procs)


def test_prefill_and_decode_instances_as_separate_jobs(ckpt):
    """P/D across worlds: the prefill job serves each request's latent KV rows on its own
    authenticated socket; the decode job fetches them and decodes with the single-instance tokens."""
    model, ref = ckpt
    procs = []
    try:
        sched = _spawn(["launch.scheduler", "--listen", "127.0.0.1:0", "--model", model,
                        "--kv-block-size", "16", "--capacity", "4", "--decode-ranks", "2"])
        procs.append(sched)
        addr = _read_line(sched, "stagger scheduler listening on").rsplit(" ", 1)[1]
        for role, ranks in (("prefill", "[0]"), ("decode", "[2]")):
            p = _spawn(["launch.instance", "--scheduler", addr, "--model", model, "--role", role] + OPTS)
            procs.append(p)
            assert _read_line(p, "stagger instance").endswith(f"ranks {ranks}")
        host, port = addr.rsplit(":", 1)
        client = SchedulerClient((host, int(port)), SECRET.encode())
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i in range(6):
            client.submit(PROMPTS[i], params, request_id=f"pd{i}")
        outs = {o.request_id: o for o in (client.next_output(timeout=60) for _ in range(6))}
        for i in range(6):
            o = outs[f"pd{i}"]
            assert o.finish_reason == "length" and o.token_ids == ref[i][:8], (i, o.finish_reason)
        client.close()
    finally:
        _kill_all(procs)
