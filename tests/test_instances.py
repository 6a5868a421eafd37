"""The global scheduler service behind several instances, driven by fake instance leaders and clients."""
import time

import pytest

from engine.channel import ChannelError
from engine.config import EngineConfig
from engine.coordinator import Coordinator
from engine.distributed import RankFailure
from engine.instances import RemoteCoordinator, SchedulerClient, SchedulerServer, instance_ranks
from engine.sampling import SamplingParams
from engine.messages import StepStats, TokenEvent
from model.config import parse_config
from reference import TINY_V3
from scheduler.load import RankLoad

SECRET = b"test-secret-0123456789abcdef"


def load(rank, running=0):
    return RankLoad(rank=rank, num_running=running, num_waiting=0, waiting_prefill_tokens=0, running_tokens=0,
                    free_kv_blocks=64, total_kv_blocks=64, block_size=16, max_num_seqs=8,
                    max_num_batched_tokens=256)


def serve(scheduler="sbs", capacity=2, dead_after_s=10.0):
    coord = Coordinator(parse_config(TINY_V3), EngineConfig(scheduler=scheduler, kv_block_size=16), None, 512,
                        None, capacity)
    server = SchedulerServer(coord, ("127.0.0.1", 0), SECRET, capacity, dead_after_s=dead_after_s)
    server.start()
    return coord, server


def leader(server, local_ranks=(0,), **kw):
    return RemoteCoordinator(server.address, SECRET, list(local_ranks), kv_blocks=64, block_size=16,
                             timeout_s=10, **kw)


def wait_for(cond, timeout=10):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def run_step(remote, specs, token, finish=False, local_rank=0):
    """One fake step on a one-rank instance: every spec produces `token`."""
    events = [TokenEvent(s.request_id, token, "", "length" if finish else None, time.time()) for s in specs]
    remote.collect([(events, StepStats(local_rank, len(specs), 0.01, 0))], None, [local_rank], 0)


def test_instance_layout():
    assert instance_ranks(4, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="divide"):
        instance_ranks(3, 2)


@pytest.mark.parametrize("scheduler", ["sbs", "immediate-rr"])
def test_dead_instance_requests_are_requeued_and_finish_once_elsewhere(scheduler):
    coord, server = serve(scheduler)
    a = leader(server, wish_ranks=[0], wish_instance=0)
    b = leader(server, local_ranks=[1], wish_ranks=[1], wish_instance=1)
    assert (a.ranks, b.ranks) == ([0], [1])
    with server.lock:
        p = SamplingParams(temperature=0, max_tokens=2)
        rids = [coord.add_request([5, 6, 7 + i], p) for i in range(3)]
        coord.closed = True
    got_a = a.plan([load(0)], [0], 0)                 # instance 0 takes (sbs: all, rr: its share) ...
    assert sum(len(v) for v in got_a.assignments.values()) == (3 if scheduler == "sbs" else 2)
    a._closed.set()
    a.ch.close()                                      # ... and dies before reporting a token
    assert wait_for(lambda: server.dead == [0])
    got_b = b.plan([load(1)], [1], 1)                 # the survivor gets all three again
    specs = [s for v in got_b.assignments.values() for s in v]
    assert sorted(s.request_id for s in specs) == sorted(rids)
    for step in range(2):                             # it runs them to completion
        run_step(b, specs, 40 + step, finish=step == 1, local_rank=1)
        got_b = b.plan([load(1, running=3)], [1], 1)
    assert got_b.stop
    for rid in rids:
        out = coord.outputs[rid]
        assert out.token_ids == [40, 41] and out.finish_reason == "length" and out.metrics.rank == 1
    b.close()
    server.close()


def test_streamed_requests_end_with_instance_lost_the_others_restart():
    """Rule: a request whose tokens reached a client ends with the error; one no client saw restarts."""
    coord, server = serve("sbs")
    a, b = leader(server), leader(server)
    assert a.ranks == [0] and b.ranks == [1]          # the scheduler numbers ranks; the leaders map them
    client = SchedulerClient(server.address, SECRET)
    p = SamplingParams(temperature=0, max_tokens=3)
    client.submit([5, 6], p, request_id="streamed", stream=True)
    client.submit([5, 7], p, request_id="quiet", stream=False)
    assert wait_for(lambda: coord.policy.num_pending() == 2)
    got = a.plan([load(0)], [0], 0)
    specs = [s for v in got.assignments.values() for s in v]
    assert sorted(s.request_id for s in specs) == ["quiet", "streamed"]
    assert list(got.assignments) == [0]               # local rank ids on the instance side
    run_step(a, specs, 9)
    first = client.next_output(timeout=5)             # only the streamed one shows up
    assert (first.request_id, first.new_token_ids, first.finished) == ("streamed", [9], False)
    a.ch.close()                                      # instance 0 dies
    lost = client.next_output(timeout=5)
    assert (lost.request_id, lost.finish_reason) == ("streamed", "error: instance lost")
    got = b.plan([load(0)], [0], 0)                   # b's own world numbers its rank 0 too
    specs = [s for v in got.assignments.values() for s in v]
    assert [s.request_id for s in specs] == ["quiet"]   # restarts from scratch on instance 1
    for step in range(3):
        run_step(b, specs, 20 + step, finish=step == 2)
    done = client.next_output(timeout=5)
    assert (done.request_id, done.token_ids, done.finish_reason) == ("quiet", [20, 21, 22], "length")
    assert not coord.has_unfinished()
    assert wait_for(lambda: "quiet" not in coord.outputs)    # handed out once, then forgotten
    client.close()
    server.close()


def test_silent_instance_is_presumed_dead_and_a_joining_one_takes_its_work():
    coord, server = serve("sbs", capacity=4, dead_after_s=1.0)
    a = leader(server, heartbeat_s=0.2)
    with server.lock:
        coord.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2), request_id="r")
    got = a.plan([load(0)], [0], 0)
    assert "r" in [s.request_id for v in got.assignments.values() for s in v]
    time.sleep(1.5)                                   # a long step: the heartbeat keeps it alive
    assert server.dead == []
    a._closed.set()                                   # now it hangs: heartbeats stop too
    assert wait_for(lambda: server.dead == [0], timeout=5)
    with pytest.raises(RankFailure):                  # its channel is closed: it learns it is out
        a.plan([load(0, running=1)], [0], 0)
    c = leader(server, local_ranks=[0, 1])            # a two-rank instance joins while serving
    assert c.ranks == [1, 2]                          # fresh ids; the dead instance's are never reused
    got = c.plan([load(0), load(1)], [0, 1], 0)
    assert [s.request_id for v in got.assignments.values() for s in v] == ["r"]
    assert set(got.assignments) <= {0, 1}
    c.close()
    server.close()


def test_drain_finishes_running_work_then_stops_and_leaves():
    coord, server = serve("immediate-rr", capacity=2)
    a, b = leader(server), leader(server)
    with server.lock:
        r0 = coord.add_request([5, 6], SamplingParams(temperature=0, max_tokens=2))
        r1 = coord.add_request([5, 7], SamplingParams(temperature=0, max_tokens=2))
    got = a.plan([load(0)], [0], 0)                   # rr: r0 went to instance 0
    specs = [s for v in got.assignments.values() for s in v]
    assert [s.request_id for s in specs] == [r0]
    a.drain()
    with server.lock:
        r2 = coord.add_request([5, 8], SamplingParams(temperature=0, max_tokens=2))
    run_step(a, specs, 1)
    got = a.plan([load(0, running=1)], [0], 0)
    assert not got.assignments and not got.stop       # draining: no new work, but r0 still runs
    run_step(a, specs, 2, finish=True)
    got = a.plan([load(0)], [0], 0)
    assert got.stop                                   # done: the instance may leave
    a.close()
    assert wait_for(lambda: server.left == [0])
    got = b.plan([load(0)], [0], 0)                   # everything else went to the other instance
    assert sorted(s.request_id for v in got.assignments.values() for s in v) == sorted([r1, r2])
    assert coord.outputs[r0].token_ids == [1, 2]
    b.close()
    server.close()


def test_registration_is_checked():
    coord, server = serve("sbs", capacity=2)
    with pytest.raises(RankFailure, match="role"):
        leader(server, role="prefill")                # no P/D on this scheduler
    with pytest.raises(RankFailure, match="block size"):
        RemoteCoordinator(server.address, SECRET, [0], kv_blocks=64, block_size=32, timeout_s=5)
    with pytest.raises(RankFailure, match="capacity"):
        leader(server, local_ranks=[0, 1, 2])
    with pytest.raises(RankFailure, match="refused"):
        RemoteCoordinator(server.address, b"not-the-secret-at-all-000", [0], timeout_s=5)
    server.close()


def test_the_finished_request_of_a_client_that_is_gone_is_forgotten():
    """Its output cannot be sent (the channel is gone): the service still forgets it."""
    coord, server = serve("immediate-rr", capacity=1)
    a = leader(server)

    def gone(out):
        raise ChannelError("connection lost")
    client = server.local_client(gone)
    rid = server.submit(client, [5, 6, 7], SamplingParams(temperature=0, max_tokens=1), stream=True)
    specs = [s for v in a.plan([load(0)], [0], 0).assignments.values() for s in v]
    assert [s.request_id for s in specs] == [rid]
    run_step(a, specs, 40, finish=True)
    a.plan([load(0)], [0], 0)   # its report was served before this plan
    with server.lock:
        assert coord.outputs == {} and server._owner == {} and client.streams == {} and not coord.seen
    a.close()
    server.close()
