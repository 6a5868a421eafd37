"""A server runs for days: nothing of a finished request, and no step record, may stay behind, on the
leader (launch.server_engine.EngineLoop, driven in-process without HTTP) or on a follower rank
(`follow`, fed here with what the leader broadcast), while /metrics still sees every step."""
import copy
import threading
import time

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.coordinator import Coordinator
from engine.distributed import LocalGroup
from engine.messages import StepStats, TokenEvent
from launch.make_checkpoint import make_checkpoint
from launch.server_engine import Choice, EngineLoop, follow
from launch.server_metrics import ServerMetrics
from model.config import parse_config
from reference import TINY_V3
from scheduler.load import RankLoad

SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    make_checkpoint(d, "tiny-v3")
    return d


class Recording(LocalGroup):
    """The leader of a two-rank instance whose follower is replayed later: keeps each broadcast."""
    world_size = 2

    def __init__(self):
        self.sent = []

    def broadcast(self, obj):
        self.sent.append(copy.deepcopy(obj))   # what a follower would unpickle
        return obj


class Replay(LocalGroup):
    """A follower: gets, one by one, what the recorded leader broadcast."""
    world_size, is_leader = 2, False

    def __init__(self, sent):
        self.sent = list(sent)

    def gather(self, obj):
        return None

    def broadcast(self, obj):
        return self.sent.pop(0)


class Client:
    """Collects each choice's deltas (the loop calls the sink from its own thread)."""

    def __init__(self):
        self.deltas, self.done, self.lock = {}, {}, threading.Lock()

    def choice(self, key, prompt, params):
        self.deltas[key], self.done[key] = [], threading.Event()

        def sink(d):
            with self.lock:
                self.deltas[key].append(d)
            if d.finish_reason is not None:
                self.done[key].set()
        return Choice(prompt, params, sink)


def wait(event, what):
    assert event.wait(60), what


def serve(llm, metrics):
    """Leader side: a mix of requests through the loop; returns the loop (stopped) and the client."""
    loop, cl = EngineLoop(llm, metrics), Client()
    th = threading.Thread(target=loop.run, daemon=True)
    th.start()
    try:
        futs = [loop.submit([cl.choice(k, [5 + k, 6, 7 + k], SHORT)]) for k in range(8)]
        futs.append(loop.submit([cl.choice(f"n{i}", [9, 8, 7], SHORT) for i in range(3)]))   # n > 1
        # one prompt of a request rejected: its valid sibling was added, then aborted, and no one
        # will ever read it
        bad = loop.submit([cl.choice("sibling", [3, 4, 5], LONG), cl.choice("bad", [10 ** 9], SHORT)])
        with pytest.raises(ValueError):
            bad.result(60)
        long = loop.submit([cl.choice("long", [11, 12, 13], LONG)]).result(60)[0]
        for f in futs:
            f.result(60)
        deadline = time.time() + 60
        while not cl.deltas["long"]:   # it runs: abort it mid-stream, as a client that leaves
            assert time.time() < deadline
            time.sleep(0.01)
        loop.abort([long])
        for k, ev in cl.done.items():
            if k not in ("sibling", "bad"):
                wait(ev, k)
        deadline = time.time() + 60
        while loop.live:   # the sibling's abort lands at a step boundary
            assert time.time() < deadline, loop.live
            time.sleep(0.01)
    finally:
        loop.stop()
        th.join(60)
    assert not th.is_alive() and loop.error is None
    assert cl.deltas["long"][-1].finish_reason == "abort"
    assert not cl.deltas["sibling"] and not cl.deltas["bad"]
    assert all(cl.deltas[k][-1].finish_reason == "length" for k in cl.deltas if k not in
               ("long", "sibling", "bad"))
    return loop, cl


def test_engine_loop_keeps_no_finished_request_nor_step_record(ckpt):
    llm = LLM(ckpt, kv_block_size=16)
    coord, metrics, taken = llm.coordinator, ServerMetrics("tiny"), []
    take = coord.take_steps

    def spy():
        got = take()
        taken.extend(got)
        return got
    coord.take_steps = spy
    serve(llm, metrics)
    assert coord.outputs == {} and coord.unfinished == set() and coord.steps == []
    assert coord._specs == {} and coord._where == {} and coord.policy.num_pending() == 0
    # every busy step reached the step-time histogram exactly once, none was lost by the draining
    busy = sum(1 for r in taken if sum(r.tokens_per_rank))
    assert busy > 0
    lbl = {"model_name": "tiny"}
    assert metrics.registry.get_sample_value("stagger_step_time_seconds_count", lbl) == busy
    # the rejected request's sibling is no client's: it is not counted as a finished request
    n = sum(metrics.registry.get_sample_value("stagger_request_success_total",
                                              dict(lbl, finished_reason=r)) or 0 for r in ("length", "abort"))
    assert n == 12


def test_a_follower_rank_keeps_no_finished_request(ckpt):
    leader, follower = LLM(ckpt, kv_block_size=16), LLM(ckpt, kv_block_size=16)
    leader.engine.group = rec = Recording()
    serve(leader, None)
    assert leader.coordinator.outputs == {} and leader.coordinator.steps == []
    follower.engine.group = Replay(rec.sent)
    follow(follower)   # returns at the leader's stop
    coord = follower.coordinator
    assert coord.outputs == {} and coord.unfinished == set() and coord._aborts == []
    assert coord._specs == {} and coord.policy.num_pending() == 0 and coord.steps == []


def test_an_abort_in_flight_for_a_dropped_output_is_ignored():
    """A request finishes on its own while its abort is on the way; the server drops the finished
    output at once: the abort's step boundary must not look for it (it did, with a KeyError)."""
    cfg = EngineConfig(scheduler="immediate-rr", kv_block_size=16)
    coord = Coordinator(parse_config(TINY_V3), cfg, None, 512, 64, 1)
    load = RankLoad(rank=0, num_running=0, num_waiting=0, waiting_prefill_tokens=0, running_tokens=0,
                    free_kv_blocks=64, total_kv_blocks=64, block_size=16, max_num_seqs=8,
                    max_num_batched_tokens=256)
    rid = coord.add_request([5, 6, 7], SamplingParams(max_tokens=1))
    msg = coord.plan([load], [0])
    assert msg.assignments[0][0].request_id == rid
    coord.abort(rid)   # the client leaves ...
    done = [([TokenEvent(rid, 9, "", "length", time.time())], StepStats(0, 3, 1, 0.01, 0))]
    (out,) = coord.collect(done, msg, [0])   # ... as its last token comes
    assert out.finished and out.finish_reason == "length"
    coord.drop_output(rid)
    msg = coord.plan([load], [0])
    assert msg.aborts == [rid]
    assert coord.collect([([], StepStats(0, 0, 0, 0.01, 0))], msg, [0]) == []
    assert coord.outputs == {} and len(coord.take_steps()) == 2 and coord.steps == []
