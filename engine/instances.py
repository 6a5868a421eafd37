"""Several instances behind one global scheduler (the cluster level of SBS).

The torchrun world splits into M instances of W/M consecutive ranks; each is its own DP+EP group
with its own process groups and step loop, so one never waits for another. One global scheduler
holds the single buffer: a server thread in global rank 0's process (not part of any step loop)
that owns the Coordinator. Each instance's leader talks to it over a socket: at every step
boundary it sends its ranks' loads and gets back what they admit now, then reports what the step
produced. Whichever instance reaches a boundary first takes the buffered work, which is what
staggers their batch starts.

Every wait is bounded. If an instance's leader disconnects (its process died), the requests it
was running go back into the buffer for the other instances, and its outputs start over.
"""
import threading
import time
from multiprocessing.connection import Client, Listener, wait

from .distributed import RankFailure

AUTHKEY = b"stagger-instances"


def instance_ranks(world_size: int, instances: int) -> list[list[int]]:
    if instances < 1 or world_size % instances:
        raise ValueError(f"instances={instances} must divide the torchrun world size {world_size}")
    n = world_size // instances
    return [list(range(i * n, (i + 1) * n)) for i in range(instances)]


class CoordinatorServer(threading.Thread):
    """Serves plan/collect calls of the instance leaders; `lock` also guards the coordinator
    against the host thread adding requests."""

    def __init__(self, coordinator, address, num_instances: int, timeout_s: float = 300.0):
        super().__init__(name="stagger-global-scheduler", daemon=True)
        self.coordinator, self.num_instances, self.timeout_s = coordinator, num_instances, timeout_s
        self.lock = threading.Lock()
        self.listener = Listener(address, authkey=AUTHKEY)
        self.address = self.listener.address
        self.conns: dict = {}          # connection -> instance id
        self.dead: list[int] = []
        self.error: Exception | None = None
        self._stop = threading.Event()

    def run(self):
        try:
            while len(self.conns) < self.num_instances:
                conn = self.listener.accept()
                self.conns[conn] = conn.recv()       # the leader says which instance it leads
            while self.conns and not self._stop.is_set():
                for conn in wait(list(self.conns), timeout=0.5):
                    self._serve(conn)
        except Exception as e:   # surfaced to the host thread by check(), and logged now
            import traceback
            traceback.print_exc()
            self.error = e
            for conn in list(self.conns):   # the leaders see a closed channel, not silence
                conn.close()

    def _serve(self, conn):
        inst = self.conns[conn]
        try:
            kind, *args = conn.recv()
        except (EOFError, OSError):
            del self.conns[conn]
            self._instance_died(inst)
            return
        with self.lock:
            if kind == "plan":
                reply = self.coordinator.plan(*args)
            elif kind == "collect":
                reply = self.coordinator.collect(*args)
            elif kind == "bye":
                del self.conns[conn]
                return
            else:
                raise RuntimeError(f"unknown message {kind!r} from instance {inst}")
        conn.send(reply)

    def _instance_died(self, inst: int) -> None:
        """Re-queue what the dead instance was running: the others finish it from scratch."""
        self.dead.append(inst)
        with self.lock:
            self.coordinator.requeue_instance(inst)

    def check(self) -> None:
        if self.error is not None:
            raise RankFailure(f"global scheduler failed: {self.error!r}") from self.error

    def close(self):
        self._stop.set()
        self.listener.close()


class RemoteCoordinator:
    """An instance leader's handle on the global scheduler (same plan/collect as Coordinator)."""

    def __init__(self, address, instance: int, timeout_s: float = 300.0):
        self.instance, self.timeout_s = instance, timeout_s
        deadline = time.time() + min(timeout_s, 60.0)
        while True:
            try:
                self.conn = Client(address, authkey=AUTHKEY)
                break
            except ConnectionRefusedError:
                if time.time() > deadline:
                    raise RankFailure(f"instance {instance}: global scheduler at {address} unreachable") from None
                time.sleep(0.05)
        self.conn.send(instance)

    def _call(self, *msg):
        try:
            self.conn.send(msg)
            if not self.conn.poll(self.timeout_s):
                raise RankFailure(f"instance {self.instance}: global scheduler silent for {self.timeout_s} s")
            return self.conn.recv()
        except (EOFError, OSError) as e:
            raise RankFailure(f"instance {self.instance}: lost the global scheduler ({e!r})") from e

    def plan(self, loads, ranks, instance):
        msg = self._call("plan", loads, ranks, instance)
        idle = not msg.assignments and all(ld.num_running == 0 and ld.num_waiting == 0 for ld in loads)
        if idle and not msg.stop:
            time.sleep(0.002)   # nothing to run: do not spin the CPU with empty steps
        return msg

    def collect(self, gathered, msg, ranks, instance):
        return self._call("collect", gathered, msg, ranks, instance)

    def close(self):
        try:
            self.conn.send(("bye",))
            self.conn.close()
        except OSError:
            pass
