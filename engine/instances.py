"""Several instances behind one global scheduler (the cluster level of SBS), each its own failure unit.

The global scheduler (`SchedulerServer`) owns the Coordinator: the single buffer and the request
registry. It runs in a thread of its own: inside global rank 0's process for the one-world layout
(`instances=M` under one torchrun), or alone as `python -m launch.scheduler`, with each instance
its own torchrun job (`launch.instance`). Both layouts use this code, over engine.channel
(authenticated, msgpack, no pickle).

Protocol of an instance leader (`RemoteCoordinator`): Register (rank count, role, KV capacity)
-> Registered (the scheduler's rank ids for its ranks; the leader translates them to and from its
own world's ranks); then at every step boundary Plan (its ranks' loads) -> StepPlanMsg and Report
(what the step produced). A heartbeat thread speaks during long steps. An instance silent for
`dead_after_s`, or whose connection drops, is presumed dead: its requests that no client has seen
a token of go back into the buffer and restart from scratch elsewhere; a request whose tokens
already reached a client ends with finish_reason "error: instance lost" (Coordinator.requeue_instance).
Nothing is lost or finished twice: a dead instance's channel is closed before its requests move.
An instance may join at any time (it takes work at its first boundary) and may drain (no new work;
it leaves when what it runs is done).

Clients (`SchedulerClient`) submit requests and receive outputs (every change when streaming, else
the finished output). A client in the scheduler's own process (the HTTP front end of
`launch.serve --scheduler-listen`) is a `local_client`: the same rules (`seen` included), with
outputs handed to a callback instead of a socket.
"""
import copy
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass, field

from scheduler.load import RankLoad
from . import channel
from .channel import ChannelError
from .distributed import RankFailure
from .messages import Recv, RequestSpec, Send, StepPlanMsg, StepStats, TokenEvent
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams

ROLES = ("mixed", "prefill", "decode")


# ---- protocol messages ---------------------------------------------------------------------------
@dataclass
class Register:
    num_ranks: int
    role: str = "mixed"
    kv_blocks: int = 0            # per rank
    block_size: int = 0
    name: str = ""
    ranks: list[int] | None = None      # wished scheduler rank ids (the one-world layout: its own)
    instance: int | None = None
    kv_addresses: list[str] | None = None   # prefill ranks of a separate world: their KV servers


@dataclass
class Registered:
    instance: int
    ranks: list[int]


@dataclass
class Refused:
    reason: str


@dataclass
class Plan:
    loads: list[RankLoad]


@dataclass
class Report:
    gathered: list          # [[list[TokenEvent], StepStats], ...] per rank


@dataclass
class Heartbeat:
    pass


@dataclass
class Drain:
    pass


@dataclass
class Bye:
    pass


@dataclass
class Submit:
    prompt: list[int] | str
    params: SamplingParams
    request_id: str | None = None
    stream: bool = False


@dataclass
class Abort:
    request_id: str


TYPES = (Register, Registered, Refused, Plan, Report, Heartbeat, Drain, Bye, Submit, Abort, RankLoad,
         StepPlanMsg, RequestSpec, TokenEvent, StepStats, Send, Recv, SamplingParams, RequestOutput,
         RequestMetrics)
CODEC = channel.Codec(TYPES)


def instance_ranks(world_size: int, instances: int) -> list[list[int]]:
    if instances < 1 or world_size % instances:
        raise ValueError(f"instances={instances} must divide the torchrun world size {world_size}")
    n = world_size // instances
    return [list(range(i * n, (i + 1) * n)) for i in range(instances)]


@dataclass
class _Instance:
    id: int
    ch: channel.Channel
    ranks: list[int]
    role: str
    kv_blocks: int
    last_heard: float
    draining: bool = False
    last_plan: StepPlanMsg | None = None
    loads: list[RankLoad] = field(default_factory=list)   # its ranks' latest loads (for /metrics)


@dataclass
class _Client:
    ch: channel.Channel
    streams: dict[str, bool] = field(default_factory=dict)   # request id -> stream every change


class _LocalSink:
    """A local client's end: `send` hands the callback a copy (the coordinator keeps mutating its
    own output), on the scheduler's thread with its lock held: the callback must only enqueue."""

    def __init__(self, deliver):
        self.deliver = deliver

    def send(self, out: RequestOutput) -> None:
        out = copy.copy(out)
        out.token_ids, out.new_token_ids = list(out.token_ids), list(out.new_token_ids)
        if out.metrics is not None:
            out.metrics = copy.copy(out.metrics)
            out.metrics.token_times = list(out.metrics.token_times)
        self.deliver(out)

    def close(self) -> None:
        pass


class SchedulerServer(threading.Thread):
    """The global scheduler service. `lock` guards the coordinator (a host thread may add requests).
    `capacity`: scheduler rank ids available over the service's life (ids are never reused)."""

    def __init__(self, coordinator, address, secret: bytes, capacity: int, dead_after_s: float = 10.0,
                 handshake_timeout_s: float = 5.0):
        super().__init__(name="stagger-global-scheduler", daemon=True)
        self.coordinator, self.capacity, self.dead_after_s = coordinator, capacity, dead_after_s
        self.lock = threading.Lock()
        self.instances: dict[channel.Channel, _Instance] = {}
        self.clients: dict[channel.Channel, _Client] = {}
        self.fresh: list[tuple[channel.Channel, float]] = []   # authenticated, not yet introduced
        self.taken: set[int] = set()
        self.kv_address: dict[int, str] = {}   # scheduler rank -> its KV server (P/D across jobs)
        self.dead: list[int] = []        # instance ids presumed dead
        self.left: list[int] = []        # instance ids that drained and left
        self.joined: list[int] = []
        self.last_report = time.time()   # when an instance last reported a step
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._new: list[channel.Channel] = []
        self._owner: dict[str, _Client] = {}   # request id -> the client that submitted it
        coordinator.set_live(range(capacity), False)   # a rank is live once its instance registers
        self.listener = channel.Listener(address, secret, CODEC, self._arrived, handshake_timeout_s)
        self.address = self.listener.address

    def _arrived(self, ch):
        with self.lock:
            self._new.append(ch)
        self._wake_w.send(b"x")

    # ---- loop ----------------------------------------------------------------------------------
    def run(self):
        import select
        try:
            while not self._stop.is_set():
                peers = [p for p, _ in self.fresh] + list(self.instances) + list(self.clients)
                ready, _, _ = select.select([self._wake_r] + peers, [], [], 0.2)
                now = time.time()
                if self._wake_r in ready:
                    self._wake_r.recv(4096)
                    with self.lock:
                        self.fresh += [(c, now) for c in self._new]
                        self._new.clear()
                for ch in ready:
                    if ch is not self._wake_r:
                        self._serve(ch, now)
                self._check_silence(time.time())
                if not self.instances:   # nobody steps: aborts of held requests finish here
                    with self.lock:
                        self._deliver(self.coordinator.settle_aborts())
        except Exception as e:   # surfaced to the host by check(), and logged now
            import traceback
            traceback.print_exc()
            self.error = e
        finally:
            for ch in [p for p, _ in self.fresh] + list(self.instances) + list(self.clients):
                ch.close()

    def _serve(self, ch, now):
        try:
            msg = ch.recv()
        except ChannelError:
            self._drop(ch)
            return
        with self.lock:
            if ch in self.instances:
                inst = self.instances[ch]
                inst.last_heard = now
                self._from_instance(inst, msg)
            elif ch in self.clients:
                self._from_client(self.clients[ch], msg)
            else:
                self.fresh = [(p, t) for p, t in self.fresh if p is not ch]
                if isinstance(msg, Register):
                    self._register(ch, msg, now)
                elif isinstance(msg, (Submit, Abort)):
                    self.clients[ch] = _Client(ch)
                    self._from_client(self.clients[ch], msg)
                else:
                    ch.close()

    def _check_silence(self, now):
        with self.lock:
            for ch, inst in list(self.instances.items()):
                if now - inst.last_heard > self.dead_after_s:
                    self._instance_lost(inst, f"silent for {now - inst.last_heard:.1f} s")
            for ch, t in list(self.fresh):
                if now - t > self.dead_after_s:   # authenticated but never said who it is
                    ch.close()
                    self.fresh.remove((ch, t))

    def _drop(self, ch):
        with self.lock:
            if ch in self.instances:
                self._instance_lost(self.instances[ch], "connection lost")
            elif ch in self.clients:
                for rid in self.clients.pop(ch).streams:   # nobody is listening any more
                    self.coordinator.abort(rid)
            else:
                self.fresh = [(p, t) for p, t in self.fresh if p is not ch]
            ch.close()

    # ---- instances -----------------------------------------------------------------------------
    def _register(self, ch, msg: Register, now):
        coord = self.coordinator
        pd = coord.decode_policy is not None
        why = None
        if msg.role not in ROLES:
            why = f"role must be one of {ROLES}, got {msg.role!r}"
        elif (msg.role == "mixed") == pd:
            why = (f"this scheduler runs {'P/D separation' if pd else 'mixed instances'}: "
                   f"role {msg.role!r} cannot join")
        elif msg.block_size and msg.block_size != coord.cfg.kv_block_size:
            why = f"KV block size {msg.block_size} differs from the scheduler's {coord.cfg.kv_block_size}"
        ranks = self._allocate(msg) if why is None else None
        if why is None and ranks is None:
            why = f"no scheduler rank ids left for {msg.num_ranks} ranks (capacity {self.capacity})"
        if why is not None:
            ch.send(Refused(why))
            ch.close()
            return
        used = set(self.joined)
        iid = msg.instance if msg.instance is not None and msg.instance not in used \
            else max(used, default=-1) + 1
        inst = _Instance(iid, ch, ranks, msg.role, msg.kv_blocks, now)
        self.instances[ch] = inst
        self.taken |= set(ranks)
        self.kv_address.update(zip(ranks, msg.kv_addresses or []))
        coord.set_live(ranks, True)
        self._fit_kv()
        self.joined.append(iid)
        ch.send(Registered(iid, ranks))

    def _allocate(self, msg: Register) -> list[int] | None:
        """The wished ids when free, else the lowest free block of the role's range."""
        lo, hi = 0, self.capacity
        split = self.coordinator.prefill_ranks
        if msg.role == "prefill":
            hi = split
        elif msg.role == "decode":
            lo = split
        want = msg.ranks
        if want and len(want) == msg.num_ranks and all(lo <= r < hi and r not in self.taken for r in want):
            return list(want)
        start = max([r + 1 for r in self.taken if lo <= r < hi], default=lo)
        if msg.num_ranks < 1 or start + msg.num_ranks > hi:
            return None
        return list(range(start, start + msg.num_ranks))

    def _fit_kv(self):
        """Validate new requests against the smallest live pool (a request must fit anywhere)."""
        pools = [i.kv_blocks for i in self.instances.values() if i.kv_blocks]
        if pools:
            self.coordinator.num_kv_blocks = min(pools)

    def _from_instance(self, inst: _Instance, msg):
        coord = self.coordinator
        if isinstance(msg, Plan):
            plan = coord.plan(msg.loads, inst.ranks, inst.id, admit=not inst.draining)
            if inst.draining and not coord.holds(inst.ranks):
                plan.stop = True
            for recvs in plan.recvs.values():   # P/D across jobs: where the decode rank fetches the KV
                for r in recvs:
                    r.src_address = self.kv_address.get(r.src)
            inst.last_plan, inst.loads = plan, msg.loads
            inst.ch.send(plan)
        elif isinstance(msg, Report):
            self.last_report = time.time()
            changed = coord.collect([tuple(g) for g in msg.gathered], inst.last_plan, inst.ranks, inst.id)
            self._deliver(changed)
        elif isinstance(msg, Drain):
            if not inst.draining:
                inst.draining = True
                coord.set_live(inst.ranks, False)
        elif isinstance(msg, Bye):
            del self.instances[inst.ch]
            if coord.holds(inst.ranks):
                self._instance_lost(inst, "left with requests still running")
            else:
                self.left.append(inst.id)
            inst.ch.close()
        elif not isinstance(msg, Heartbeat):
            self._instance_lost(inst, f"unexpected {type(msg).__name__}")

    def _instance_lost(self, inst: _Instance, why: str):
        """Close the channel first (a late report can no longer land), then move its requests."""
        self.instances.pop(inst.ch, None)
        inst.ch.close()
        self.dead.append(inst.id)
        print(f"[stagger scheduler] instance {inst.id} (ranks {inst.ranks}) presumed dead: {why}", flush=True)
        self._deliver(self.coordinator.requeue_instance(inst.id, inst.ranks))
        self._fit_kv()

    # ---- clients -------------------------------------------------------------------------------
    def _from_client(self, client: _Client, msg):
        if isinstance(msg, Submit):
            try:
                self._submit(client, msg)
            except (ValueError, TypeError) as e:
                client.ch.send(RequestOutput(msg.request_id or "", None, [], finish_reason=f"error: {e}"))
        elif isinstance(msg, Abort):
            self.coordinator.abort(msg.request_id)

    def _submit(self, client: _Client, msg: Submit, arrival_time: float | None = None) -> str:
        rid = self.coordinator.add_request(msg.prompt, msg.params, request_id=msg.request_id,
                                           arrival_time=arrival_time)
        client.streams[rid] = msg.stream
        self._owner[rid] = client
        return rid

    # ---- a client in this process ---------------------------------------------------------------
    def local_client(self, deliver) -> _Client:
        """`deliver(output)` gets what a channel client would receive: every change of a streaming
        request (which then counts as seen), the finished output of the others. It runs on the
        scheduler's thread with `lock` held, so it must only enqueue."""
        return _Client(_LocalSink(deliver))

    def submit(self, client: _Client, prompt, params: SamplingParams, *, request_id: str | None = None,
               stream: bool = False, arrival_time: float | None = None) -> str:
        """Queue a request for a local client. Raises ValueError (TypeError) as add_request does."""
        with self.lock:
            return self._submit(client, Submit(prompt, params, request_id, stream), arrival_time)

    def abort(self, request_id: str) -> None:
        """Idempotent; the request finishes with "abort" at the next step boundary (at once when
        no instance is registered)."""
        with self.lock:
            self.coordinator.abort(request_id)

    def live_instances(self) -> int:
        return sum(not i.draining for i in list(self.instances.values()))

    def loads(self) -> list[RankLoad]:
        """The live instances' ranks' latest loads (each instance sends them with its Plan)."""
        return [ld for i in list(self.instances.values()) for ld in i.loads]

    def _deliver(self, outputs):
        for out in outputs:
            client = self._owner.get(out.request_id)
            if client is None:
                continue   # a host-side request (generate() in the one-world layout)
            stream = client.streams.get(out.request_id, False)
            if stream or out.finished:
                try:
                    client.ch.send(out)
                    if stream and out.new_token_ids:
                        self.coordinator.seen.add(out.request_id)   # a client saw tokens: no restart
                except ChannelError:
                    pass   # the client is gone (its requests are aborted): still forget a finished one
            if out.finished:
                self._owner.pop(out.request_id, None)
                client.streams.pop(out.request_id, None)
                self.coordinator.drop_output(out.request_id)

    # ---- host side ------------------------------------------------------------------------------
    def check(self) -> None:
        if self.error is not None:
            raise RankFailure(f"global scheduler failed: {self.error!r}") from self.error

    def close(self):
        self._stop.set()
        self.listener.close()
        self._wake_w.send(b"x")


class RemoteCoordinator:
    """An instance leader's handle on the global scheduler (same plan/collect as Coordinator).
    `local_ranks`: this instance's ranks in its own world; the scheduler's ids are mapped in and out."""

    def __init__(self, address, secret: bytes, local_ranks: list[int], *, role: str = "mixed",
                 kv_blocks: int = 0, block_size: int = 0, wish_ranks=None, wish_instance=None,
                 timeout_s: float = 300.0, heartbeat_s: float = 1.0, name: str = "", kv_addresses=None):
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        deadline = time.time() + min(timeout_s, 60.0)
        while True:
            try:
                self.ch = channel.connect(address, secret, CODEC, timeout_s=10.0)
                break
            except channel.AuthError as e:
                raise RankFailure(f"global scheduler at {address} refused this instance: {e}") from None
            except ChannelError as e:
                if time.time() > deadline:
                    raise RankFailure(f"global scheduler at {address} unreachable: {e}") from None
                time.sleep(0.1)
        self.ch.send(Register(len(local_ranks), role, kv_blocks, block_size, name, wish_ranks, wish_instance,
                              kv_addresses))
        reply = self._recv()
        if isinstance(reply, Refused):
            raise RankFailure(f"global scheduler refused this instance: {reply.reason}")
        self.instance, self.ranks = reply.instance, reply.ranks
        self.to_sched = dict(zip(local_ranks, reply.ranks))
        self.to_local = {s: r for r, s in self.to_sched.items()}
        self._last_send = time.time()
        self._closed = threading.Event()
        threading.Thread(target=self._beat, name="stagger-heartbeat", daemon=True).start()

    def _beat(self):
        while not self._closed.wait(self.heartbeat_s / 2):
            if time.time() - self._last_send >= self.heartbeat_s / 2:
                try:
                    self._send(Heartbeat())
                except RankFailure:
                    return

    def _send(self, msg):
        try:
            self.ch.send(msg)
            self._last_send = time.time()
        except ChannelError as e:
            raise RankFailure(f"instance {getattr(self, 'instance', '?')}: lost the global scheduler "
                              f"({e})") from e

    def _recv(self):
        try:
            return self.ch.recv(timeout=self.timeout_s)
        except ChannelError as e:
            raise RankFailure(f"instance {getattr(self, 'instance', '?')}: lost the global scheduler "
                              f"({e})") from e

    def plan(self, loads, ranks, instance):
        self._send(Plan([dataclasses.replace(ld, rank=self.to_sched[ld.rank]) for ld in loads]))
        msg = self._recv()
        if not isinstance(msg, StepPlanMsg):
            raise RankFailure(f"instance {self.instance}: unexpected reply {type(msg).__name__}")
        loc = self.to_local
        msg.assignments = {loc[r]: v for r, v in msg.assignments.items()}
        msg.sends = {loc[r]: [dataclasses.replace(s, dst=loc.get(s.dst, s.dst)) for s in v]
                     for r, v in msg.sends.items()}
        msg.recvs = {loc[r]: [dataclasses.replace(x, src=x.src_address or loc.get(x.src, x.src)) for x in v]
                     for r, v in msg.recvs.items()}   # another world's rank: its KV server's address
        idle = not msg.assignments and all(ld.num_running == 0 and ld.num_waiting == 0 for ld in loads)
        if idle and not msg.stop:
            time.sleep(0.005)   # nothing to run: do not spin the CPU with empty steps
        return msg

    def collect(self, gathered, msg, ranks, instance):
        to = self.to_sched
        self._send(Report([[ev, dataclasses.replace(st, rank=to[st.rank])] for ev, st in gathered]))
        return []   # outputs go to the scheduler's clients, not back to the instance

    def drain(self):
        """No new work; the scheduler says stop once this instance's requests are done."""
        self._send(Drain())

    def close(self):
        self._closed.set()
        try:
            self.ch.send(Bye())
        except ChannelError:
            pass
        self.ch.close()


class SchedulerClient:
    """Submit requests to a global scheduler service and read their outputs."""

    def __init__(self, address, secret: bytes, timeout_s: float = 10.0):
        self.ch = channel.connect(address, secret, CODEC, timeout_s)

    def submit(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
               stream: bool = False) -> None:
        self.ch.send(Submit(prompt, params or SamplingParams(), request_id, stream))

    def abort(self, request_id: str) -> None:
        self.ch.send(Abort(request_id))

    def next_output(self, timeout: float | None = None) -> RequestOutput:
        return self.ch.recv(timeout)

    def close(self):
        self.ch.close()
