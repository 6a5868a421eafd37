"""The server's step loop: the engine runs on its own thread, never on the HTTP event loop.

Why a thread and two thread-safe queues (and not a second process over ZMQ, as SGLang does): the
engine's heavy work (torch forwards, gloo collectives) releases the GIL, so a thread next to the
event loop costs little, and nothing has to be serialized between the HTTP side and the engine:
a request crosses as a Python object through a `queue.Queue` (the inbox, drained at each step
boundary), and each output delta comes back through `loop.call_soon_threadsafe` into the
request's asyncio queue. Tokenizing, chat templates and JSON stay on the HTTP side (in worker
threads), so the engine thread only adds, aborts, steps and hands out deltas. The cost this adds
is measured in bench/RESULTS.md ("HTTP server (issue 17)": HTTP vs in-process, same workload).

Under torchrun the leader (global rank 0) takes new requests and aborts off the inbox and
broadcasts them to every rank of the instance at a step boundary over the control-plane group, so
all ranks add the same requests in the same order and agree on when to step and when to stop
(`follow`). With several instances rank 0 adds to the global scheduler directly; the other
instances' leaders get their work from it as usual.

`SchedulerLoop` is the same loop in front of a global scheduler service hosted in this process
(`launch.serve --scheduler-listen`): no engine here; requests go into the SchedulerServer's
coordinator as a local client's, instances that are jobs of their own (`launch.instance`) run
them, and their outputs come back through the same inbox. Streaming requests count as seen once
their tokens are handed over (engine/instances.py), so a lost instance ends them with
"error: instance lost" instead of restarting them; the others restart elsewhere unnoticed.
"""
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field

from engine import SamplingParams

HEARTBEAT_S = 0.5     # an idle leader still broadcasts this often (collectives have timeouts)
LOAD_EVERY_S = 0.5    # how often rank loads (KV use, running, waiting) are gathered for /metrics


class Unavailable(Exception):
    """The server is draining or full: the HTTP side answers 503."""


@dataclass
class Choice:
    """One engine request (an HTTP request with n > 1 or several prompts has several)."""
    prompt_ids: list[int]
    params: SamplingParams
    sink: object                    # callable(Delta), thread-safe (wraps call_soon_threadsafe)
    index: int = 0
    deadline: float | None = None   # absolute time.time(); past it the request is aborted
    arrival: float | None = None    # when the HTTP request came in (the engine's arrival_time)
    request_id: str = ""
    stream: bool = False            # its client sees every token as it comes (a global scheduler's rule)


@dataclass
class Delta:
    """What changed for one choice since the last delta."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # stop | length | abort | timeout | shutdown | error: ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Track:
    choice: Choice
    holdback: int                 # characters kept back while a stop string could still match
    sent_tokens: int = 0
    sent_text: int = 0
    first_seen: bool = False
    reason: str | None = None     # our own reason for an abort (timeout, shutdown)
    quiet: bool = False           # cancelled as it came (a sibling was rejected): no client, no metrics


@dataclass
class _Msg:
    """Broadcast to every rank of the instance at a step boundary (plain data only)."""
    adds: list = field(default_factory=list)     # (prompt_ids, params, request_id, arrival_time)
    aborts: list = field(default_factory=list)
    step: bool = False
    stop: bool = False
    gather_loads: bool = False


class EngineLoop:
    """Runs on global rank 0 (`run`, on its own thread); the other ranks call `follow`."""

    def __init__(self, llm, metrics=None, *, max_pending: int | None = None):
        self.llm, self.engine, self.metrics = llm, llm and llm.engine, metrics
        self.several = llm is not None and llm.config.instances > 1
        self.inbox: queue.Queue = queue.Queue()
        self.live: dict[str, _Track] = {}
        self.max_pending = max_pending
        self.pending = 0               # requests accepted that have no token yet (HTTP side reads it)
        self.ready = threading.Event()
        self.draining = False
        self.drain_deadline: float | None = None
        self._stop = threading.Event()
        self.last_step = time.time()   # /health: when the loop last advanced
        self.error: BaseException | None = None
        self._ids = 0
        self._next_load = 0.0
        self._lock = threading.Lock()

    # ---- called from the HTTP side (any thread) --------------------------------------------------
    def submit(self, choices: list[Choice]) -> concurrent.futures.Future:
        """All choices start, or none (the future then holds the ValueError / Unavailable)."""
        fut = concurrent.futures.Future()
        with self._lock:
            if self.draining or self._stop.is_set():
                fut.set_exception(Unavailable("the server is shutting down"))
                return fut
            if self.max_pending is not None and self.pending + len(choices) > self.max_pending:
                fut.set_exception(Unavailable(f"{self.pending} requests already wait (--max-pending "
                                              f"{self.max_pending}); retry later"))
                return fut
            self.pending += len(choices)
        self.inbox.put(("submit", choices, fut))
        return fut

    def abort(self, request_ids) -> None:
        self.inbox.put(("abort", list(request_ids), None))

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; running ones get `grace_s` seconds, then they are aborted."""
        with self._lock:
            self.draining = True
            self.drain_deadline = time.time() + grace_s
        self.inbox.put(("wake", None, None))

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None, None))

    def healthy(self, stall_s: float) -> tuple[bool, str]:
        if self.error is not None:
            return False, f"step loop failed: {self.error!r}"
        if not self.ready.is_set():
            return False, "starting"
        if self.draining or self._stop.is_set():
            return False, "draining"
        if self.live and time.time() - self.last_step > stall_s:
            return False, f"no step for {time.time() - self.last_step:.1f} s with work waiting"
        return True, "ok"

    # ---- rank 0's loop -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.ready.set()
            if self.metrics is not None:
                self.metrics.instances.set(self._instances())
            self._run()
        except BaseException as e:   # surfaced by /health and by the main thread
            import traceback
            traceback.print_exc()
            self.error = e
            for tr in list(self.live.values()):
                self._send(tr, Delta(tr.choice.index, "", [], finish_reason=f"error: {e!r}"))
            self.live.clear()

    def _run(self) -> None:
        eng = self.engine
        group = eng.group
        while True:
            busy = bool(self.live) or (not self.several and eng.has_unfinished())
            items = self._take(block=not busy and not self.several)
            msg = _Msg()
            for kind, payload, fut in items:
                if kind == "submit":
                    self._add(payload, fut, msg)
                elif kind == "abort":
                    for rid in payload:
                        self._abort(rid, None, msg)
            now = time.time()
            self._expire(now, msg)
            msg.stop = self._stop.is_set() and not self.live
            if self.several:
                if not self._step_several(msg.stop):
                    return
                continue
            msg.step = eng.has_unfinished() and not msg.stop
            msg.gather_loads = now >= self._next_load
            if group.world_size > 1:
                group.broadcast(msg)
            if msg.gather_loads:
                self._next_load = now + LOAD_EVERY_S
                loads = group.gather(eng.worker.load())
                if self.metrics is not None:
                    self.metrics.observe_loads(loads, self._buffered())
            if msg.stop:
                return
            if msg.step:
                changed = eng.step()
                self.last_step = time.time()
                for out in changed:
                    tr = self.live.get(out.request_id)
                    if tr is not None:
                        self._deliver(tr, out)
                self._observe_steps()
            else:
                self.last_step = time.time()

    def _expire(self, now: float, msg: _Msg) -> None:
        """Abort what is past its deadline, or past the drain's grace period."""
        for rid, tr in list(self.live.items()):
            if tr.choice.deadline is not None and now > tr.choice.deadline:
                self._abort(rid, "timeout", msg)
            elif (self.draining and now > self.drain_deadline) or self._stop.is_set():
                self._abort(rid, "shutdown", msg)

    def _instances(self) -> int:
        return self.llm.config.instances

    def _start(self, c: Choice) -> None:
        self.engine.add_request(c.prompt_ids, c.params, request_id=c.request_id, arrival_time=c.arrival)

    def _cancel(self, rid: str) -> None:
        self.engine.abort(rid)

    def _step_several(self, stop: bool) -> bool:
        """Several instances: instance 0 steps in lockstep like the others; outputs of every
        instance land in the global coordinator, so live requests are read from it."""
        eng = self.engine
        if stop:
            with eng.lock:
                eng.coordinator.closed = True
        if eng.stopped:
            return False
        eng.step()
        self.last_step = time.time()
        with eng.lock:
            for rid, tr in list(self.live.items()):
                out = eng.outputs.get(rid)
                if out is not None and (len(out.token_ids) > tr.sent_tokens or out.finished):
                    self._deliver(tr, out)
        self._observe_steps()
        if time.time() >= self._next_load and self.metrics is not None:
            self._next_load = time.time() + LOAD_EVERY_S
            self.metrics.observe_loads([eng.worker.load()], self._buffered())
        return True

    def _take(self, block: bool) -> list:
        items = []
        if block:
            try:
                items.append(self.inbox.get(timeout=HEARTBEAT_S))
            except queue.Empty:
                return items
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def _add(self, choices: list[Choice], fut, msg: _Msg) -> None:
        if not fut.set_running_or_notify_cancel():   # the client left before it was taken
            self._unpend(len(choices))
            return
        if self.draining or self._stop.is_set():
            self._unpend(len(choices))
            fut.set_exception(Unavailable("the server is shutting down"))
            return
        added = []
        now = time.time()
        try:
            for c in choices:
                self._ids += 1
                c.request_id = f"srv-{self._ids}"
                c.arrival = c.arrival or now
                self._start(c)
                added.append(c)
        except ValueError as e:
            for c in added:   # tracked until their aborts finish (then dropped), no client sees them
                self._cancel(c.request_id)
                self.live[c.request_id] = _Track(c, 0, first_seen=True, reason="abort", quiet=True)
            msg.adds += [(c.prompt_ids, c.params, c.request_id, c.arrival) for c in added]
            msg.aborts += [c.request_id for c in added]
            self._unpend(len(choices))
            fut.set_exception(e)
            return
        for c in choices:
            hold = max((len(s) for s in c.params.stop), default=1) - 1
            self.live[c.request_id] = _Track(c, hold)
            msg.adds.append((c.prompt_ids, c.params, c.request_id, c.arrival))
        fut.set_result([c.request_id for c in choices])

    def _abort(self, rid: str, reason: str | None, msg: _Msg) -> None:
        tr = self.live.get(rid)
        if tr is None or tr.reason is not None:
            return   # finished already, or its abort is on the way (abort is idempotent)
        tr.reason = reason or "abort"
        self._cancel(rid)
        msg.aborts.append(rid)

    def _unpend(self, n: int) -> None:
        with self._lock:
            self.pending -= n

    def _buffered(self) -> int:
        """Requests the global scheduler still holds (not released to a rank yet)."""
        outs = self.engine.outputs
        return sum(1 for rid in list(self.live) if (o := outs.get(rid)) is not None
                   and o.metrics is not None and o.metrics.release_time is None)

    def _deliver(self, tr: _Track, out) -> None:
        toks = out.token_ids[tr.sent_tokens:]
        tr.sent_tokens = len(out.token_ids)
        text = out.text or ""
        end = len(text) if out.finished else max(tr.sent_text, len(text) - tr.holdback)
        delta = text[tr.sent_text:end]
        tr.sent_text = end
        if (toks or out.finished) and not tr.first_seen:
            tr.first_seen = True
            self._unpend(1)
        reason = out.finish_reason
        if reason == "abort" and tr.reason is not None:
            reason = tr.reason
        d = Delta(tr.choice.index, delta, toks, reason, len(out.prompt_token_ids), len(out.token_ids),
                  out.num_cached_tokens)
        if out.finished:   # a server runs for days: nothing of a finished request stays
            del self.live[out.request_id]
            self._drop(out.request_id)
            if self.metrics is not None and not tr.quiet:
                self.metrics.observe_finished(out, reason)
        self._send(tr, d)

    def _send(self, tr: _Track, d: Delta) -> None:
        if tr.quiet:
            return
        try:
            tr.choice.sink(d)
        except RuntimeError:   # the client's event loop is gone (server shutting down)
            pass

    def _drop(self, rid: str) -> None:
        self.engine.drop_output(rid)

    def _observe_steps(self) -> None:
        """Take the engine's step records (so they do not pile up) into the step metrics."""
        for rec in self.engine.take_steps():
            if self.metrics is not None:
                self.metrics.observe_step(rec)


class SchedulerLoop(EngineLoop):
    """The HTTP front end of a global scheduler service hosted in this process (no engine, no
    weights): the HTTP side's surface is EngineLoop's; what differs is where requests go (the
    SchedulerServer, as a local client) and where outputs come from (its deliveries, through the
    inbox). Aborts and timeouts go to the coordinator; they finish at an instance's next step
    boundary, or at once while no instance is registered."""

    def __init__(self, server, metrics=None, *, max_pending: int | None = None):
        super().__init__(None, metrics, max_pending=max_pending)
        self.server = server
        self.client = server.local_client(lambda out: self.inbox.put(("output", out, None)))

    def healthy(self, stall_s: float) -> tuple[bool, str]:
        if self.server.error is not None:
            return False, f"global scheduler failed: {self.server.error!r}"
        ok, why = super().healthy(stall_s)
        if ok and not self.server.live_instances():
            return False, "no instance registered"
        return ok, why

    def _instances(self) -> int:
        return self.server.live_instances()

    def _start(self, c: Choice) -> None:
        self.server.submit(self.client, c.prompt_ids, c.params, request_id=c.request_id, stream=c.stream,
                           arrival_time=c.arrival)

    def _cancel(self, rid: str) -> None:
        self.server.abort(rid)

    def _drop(self, rid: str) -> None:
        pass   # the scheduler drops a finished output itself once it has delivered it

    def _run(self) -> None:
        server = self.server
        while True:
            server.check()
            msg = _Msg()   # nothing to broadcast here: no ranks in this process
            for kind, payload, fut in self._take(block=True):
                if kind == "submit":
                    self._add(payload, fut, msg)
                elif kind == "abort":
                    for rid in payload:
                        self._abort(rid, None, msg)
                elif kind == "output" and (tr := self.live.get(payload.request_id)) is not None:
                    self._deliver(tr, payload)
            now = time.time()
            self._expire(now, msg)
            # /health's stall rule: with work waiting, some instance must keep reporting steps
            self.last_step = now if not self.live else max(self.last_step, server.last_report)
            self._observe_steps()
            if self.metrics is not None and now >= self._next_load:
                self._next_load = now + LOAD_EVERY_S
                self.metrics.instances.set(server.live_instances())
                self.metrics.observe_loads(server.loads(), self._buffered())
            if self._stop.is_set() and not self.live:
                return

    def _buffered(self) -> int:
        coord = self.server.coordinator
        with self.server.lock:
            return sum(1 for rid in list(self.live) if (o := coord.outputs.get(rid)) is not None
                       and o.metrics is not None and o.metrics.release_time is None)

    def _observe_steps(self) -> None:
        with self.server.lock:
            new = self.server.coordinator.take_steps()
        for rec in new:
            if self.metrics is not None:
                self.metrics.observe_step(rec)


def follow(llm) -> None:
    """A rank other than global rank 0: apply what the leader broadcasts, step when it steps,
    stop when it stops. With several instances, step until the global scheduler says stop."""
    eng = llm.engine
    if llm.config.instances > 1:
        while not eng.stopped:
            eng.step()
        return
    group = eng.group
    while True:
        msg: _Msg = group.broadcast(None)
        for ids, params, rid, arrival in msg.adds:
            eng.add_request(ids, params, request_id=rid, arrival_time=arrival)
        for rid in msg.aborts:
            eng.abort(rid)
        if msg.gather_loads:
            group.gather(eng.worker.load())
        if msg.stop:
            return
        if msg.step:
            for out in eng.step():
                if out.finished:   # nobody reads outputs here: the leader answers the clients
                    eng.drop_output(out.request_id)
