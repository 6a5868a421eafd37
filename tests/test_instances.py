"""The global scheduler server behind several instances, driven by fake instance leaders."""
import threading
import time

from engine.config import EngineConfig
from engine.coordinator import Coordinator
from engine.instances import CoordinatorServer, RemoteCoordinator, instance_ranks
from engine.sampling import SamplingParams
from engine.worker import StepStats, TokenEvent
from model.config import parse_config
from reference import TINY_V3
from scheduler.load import RankLoad

import pytest


def load(rank, running=0):
    return RankLoad(rank=rank, num_running=running, num_waiting=0, waiting_prefill_tokens=0, running_tokens=0,
                    free_kv_blocks=64, total_kv_blocks=64, block_size=16, max_num_seqs=8,
                    max_num_batched_tokens=256)


def test_instance_layout():
    assert instance_ranks(4, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="divide"):
        instance_ranks(3, 2)


@pytest.mark.parametrize("scheduler", ["sbs", "immediate-rr"])
def test_dead_instance_requests_are_requeued_and_finish_once_elsewhere(scheduler):
    coord = Coordinator(parse_config(TINY_V3), EngineConfig(scheduler=scheduler, kv_block_size=16), None, 512, 64, 2)
    server = CoordinatorServer(coord, ("127.0.0.1", 0), 2, timeout_s=10)
    server.start()
    a = RemoteCoordinator(server.address, 0, timeout_s=10)
    b = RemoteCoordinator(server.address, 1, timeout_s=10)
    with server.lock:
        rids = [coord.add_request([5, 6, 7 + i], SamplingParams(temperature=0, max_tokens=2)) for i in range(3)]
        coord.closed = True
    got_a = a.plan([load(0)], [0], 0)                 # instance 0 takes (sbs: all, rr: its share) ...
    assert sum(len(v) for v in got_a.assignments.values()) == (3 if scheduler == "sbs" else 2)
    a.conn.close()                                    # ... and dies before reporting a token
    deadline = time.time() + 10
    while not server.dead and time.time() < deadline:
        time.sleep(0.01)
    assert server.dead == [0]
    got_b = b.plan([load(1)], [1], 1)                 # the survivor gets all three again
    specs = [s for v in got_b.assignments.values() for s in v]
    assert sorted(s.request_id for s in specs) == sorted(rids)
    for step in range(2):                             # it runs them to completion
        events = [TokenEvent(s.request_id, 40 + step, "", "length" if step == 1 else None, time.time()) for s in specs]
        b.collect([(events, StepStats(1, 3, 3, 0.01, 0))], got_b, [1], 1)
        got_b = b.plan([load(1, running=3)], [1], 1)
    assert got_b.stop
    for rid in rids:
        out = coord.outputs[rid]
        assert out.token_ids == [40, 41] and out.finish_reason == "length" and out.metrics.rank == 1
    b.close()
    server.close()
