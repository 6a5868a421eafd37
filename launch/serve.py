"""OpenAI-compatible HTTP server in front of the engine (and its staggered scheduler).

    python -m launch.serve --model DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--api-key KEY] [--max-pending N] [--scheduler sbs] [--max-num-seqs 64] [--instances M] ...
    torchrun --nproc-per-node N -m launch.serve --model DIR ...       (also: stagger-serve ...)
    python -m launch.serve --model DIR --scheduler-listen HOST:PORT [--scheduler sbs] ...

Global rank 0 runs the HTTP front end (FastAPI on uvicorn, on the main thread) and the step loop
on a thread of its own (launch/server_engine.py says why a thread); every other rank runs its step
loop, fed at step boundaries by rank 0 (launch/server_engine.follow). Endpoints: POST
/v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models, /health, /version,
/metrics (launch/server_api.py). Every engine option (engine/config.py) is a flag.

--scheduler-listen HOST:PORT: this process is the HTTP front end of a global scheduler service and
loads no weights. It hosts the SchedulerServer (launch/scheduler.py's, the single SBS buffer and
request registry) on HOST:PORT (port 0: any free port; the address is printed on stdout as
"stagger scheduler listening on HOST:PORT") and instances join as jobs of their own, exactly as
with `python -m launch.scheduler`:

    STAGGER_SECRET_FILE=secret torchrun --nproc-per-node N -m launch.instance --scheduler HOST:PORT \
        --model DIR [-o kv_block_size=64 ...]

Only the scheduler's options apply here (--scheduler, --scheduler-opt, --kv-block-size (must match
the instances'), --max-model-len, --dead-after-s, --scheduler-capacity, --scheduler-decode-ranks);
the other engine options are the instances'. /health is 503 while no instance takes work;
/metrics has stagger_num_instances. A streaming request whose instance dies after its tokens were
sent ends with an error event (code instance_lost); any other request restarts on another instance.

SIGTERM/SIGINT: stop accepting (new requests and /health get 503), let running requests finish
within --grace-period seconds, abort the rest (their clients get a clean error), then every rank
leaves its loop together and exits 0. With --scheduler-listen the instances are then told to stop
(they leave cleanly, as drained instances do) before the scheduler closes.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import types

from engine.config import EngineConfig

_SKIP = {"scheduler_options", "order_options"}
_FRONT_END = {"scheduler", "scheduler_options", "kv_block_size", "max_model_len", "dead_after_s"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--api-key", default=os.environ.get("STAGGER_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--max-pending", type=int, default=None,
                   help="503 once this many requests wait for their first token")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="per-request deadline in seconds (a request's own 'timeout' field may shorten it)")
    p.add_argument("--health-stall", type=float, default=30.0,
                   help="/health is 503 when the loop has not stepped for this long with work waiting")
    p.add_argument("--scheduler-listen", metavar="HOST:PORT", default=None,
                   help="host a global scheduler service here; instances join with launch.instance")
    p.add_argument("--scheduler-capacity", type=int, default=256,
                   help="with --scheduler-listen: scheduler rank ids over the service's life")
    p.add_argument("--scheduler-decode-ranks", type=int, default=0,
                   help="with --scheduler-listen, P/D: the last K rank ids are for decode instances")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--log-level", default="warning")
    g = p.add_argument_group("engine options (engine/config.py)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _SKIP:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in kind:
            g.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction)
        elif "int" in kind:
            g.add_argument(_flag(f.name), dest=f.name, type=int, default=None)
        elif "float" in kind:
            g.add_argument(_flag(f.name), dest=f.name, type=float, default=None)
        else:
            g.add_argument(_flag(f.name), dest=f.name, default=None)
    g.add_argument("--scheduler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="global scheduler option, e.g. max_wait_s=0.5 (repeatable)")
    g.add_argument("--order-opt", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.max_pending is not None and a.max_pending < 1:
        p.error("--max-pending must be >= 1")
    if a.scheduler_listen is not None:
        extra = sorted(_flag(k) for k in engine_options(a) if k not in _FRONT_END)
        if extra:
            p.error(f"with --scheduler-listen this process runs no engine: {', '.join(extra)} belong to "
                    "the instances (python -m launch.instance ... -o key=value)")
    return a


def _value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def engine_options(a) -> dict:
    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(EngineConfig)
            if f.name not in _SKIP and getattr(a, f.name) is not None}
    for key, items in (("scheduler_options", a.scheduler_opt), ("order_options", a.order_opt)):
        if items:
            opts[key] = {k: _value(v) for k, v in (o.split("=", 1) for o in items)}
    return opts


def make_state(llm, a, scheduler=None):
    """The engine loop and the HTTP state (not started). scheduler: a SchedulerServer hosted here
    instead of an engine (llm is then None)."""
    from .server_api import ServerState
    from .server_engine import EngineLoop, SchedulerLoop
    from .server_metrics import ServerMetrics
    from .server_protocol import ChatTemplate
    name = a.served_model_name or a.model
    metrics = ServerMetrics(name)
    if scheduler is None:
        loop = EngineLoop(llm, metrics, max_pending=a.max_pending)
        max_len = llm.config.max_model_len or llm.model_config.max_position_embeddings
    else:
        coord = scheduler.coordinator
        # what the routes read of an engine: its tokenizer and model config
        llm = types.SimpleNamespace(tokenizer=coord.tokenizer, model_config=coord.model_cfg)
        loop = SchedulerLoop(scheduler, metrics, max_pending=a.max_pending)
        max_len = coord.max_model_len
    return ServerState(llm, loop, metrics, name, a.model, max_len, ChatTemplate(a.model), a.api_key,
                       a.health_stall, a.request_timeout, int(time.time()))


class DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT also starts the engine's drain. uvicorn would
    re-raise a captured signal once it is done (the process would then die by it); the drain is
    the graceful path, so the signal is not kept and the process exits 0."""

    def __new__(cls, config, on_signal, install_signals: bool = True):
        import contextlib
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if self.should_exit:
                    self.force_exit = True   # a second signal: stop waiting for connections
                    return
                on_signal()
                self.should_exit = True

            def capture_signals(self):
                return super().capture_signals() if install_signals else contextlib.nullcontext()
        return _Server(config)


def build_server(llm, a, *, install_signals: bool = True, scheduler=None):
    """Rank 0 (or the front end of `scheduler`, a started SchedulerServer): start the step-loop
    thread; -> (uvicorn server, not running yet, state, thread)."""
    import uvicorn
    from .server_api import build_app
    st = make_state(llm, a, scheduler)
    thread = threading.Thread(target=st.loop.run, name="stagger-step-loop", daemon=True)
    thread.start()
    config = uvicorn.Config(build_app(st), host=a.host, port=a.port, log_level=a.log_level,
                            timeout_graceful_shutdown=a.grace_period + 5, timeout_keep_alive=5)
    server = DrainingServer(config, lambda: st.loop.drain(a.grace_period), install_signals)
    return server, st, thread


def finish(st, thread, timeout_s: float) -> None:
    """After uvicorn returned: abort what is left, stop the loop (and with it every rank)."""
    st.loop.drain(0.0)
    st.loop.stop()
    thread.join(timeout=timeout_s)


def serve(llm, a, scheduler=None):
    server, st, thread = build_server(llm, a, scheduler=scheduler)
    print(f"stagger: serving {st.model_name} on http://{a.host}:{a.port}", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        finish(st, thread, a.grace_period + 30)
    return st


def host_scheduler(a):
    """--scheduler-listen: the global scheduler service of launch.scheduler, started here."""
    from .scheduler import make_server
    opts = engine_options(a)
    sched = make_server(a.model, a.scheduler_listen, scheduler=opts.get("scheduler", "sbs"),
                        scheduler_options=opts.get("scheduler_options"),
                        kv_block_size=opts.get("kv_block_size", 64), max_model_len=opts.get("max_model_len"),
                        capacity=a.scheduler_capacity, decode_ranks=a.scheduler_decode_ranks,
                        dead_after_s=opts.get("dead_after_s", 10.0))
    sched.start()
    host, port = sched.address
    print(f"stagger scheduler listening on {host}:{port}", flush=True)
    return sched


def release(sched, timeout_s: float) -> None:
    """Tell the instances to stop (each leaves at its next boundary once nothing runs, saying Bye),
    wait for them within a bound, then close the service."""
    with sched.lock:
        sched.coordinator.closed = True
    deadline = time.time() + timeout_s
    while sched.instances and time.time() < deadline and sched.is_alive():
        time.sleep(0.05)
    sched.close()


def _follower_signals(grace: float) -> None:
    """Other ranks: a signal is rank 0's business (it broadcasts the stop); if rank 0 never does,
    leave anyway after a bound."""
    def handler(sig, frame):
        def last_resort():
            time.sleep(grace + 60)
            print(f"rank {os.environ.get('RANK')}: no stop from rank 0, leaving", file=sys.stderr, flush=True)
            os._exit(1)
        threading.Thread(target=last_resort, daemon=True).start()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.scheduler_listen is not None:
        sched = host_scheduler(a)
        try:
            serve(None, a, sched)
        finally:
            release(sched, 10.0)
        return 0
    from engine import LLM
    from .server_engine import follow
    llm = LLM(a.model, dtype=a.dtype, **engine_options(a))
    if int(os.environ.get("RANK", 0)) != 0:
        _follower_signals(a.grace_period)
        follow(llm)
    else:
        serve(llm, a)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # every rank (every instance: its stop plan) is done before rank 0 closes the global
        # scheduler; and gloo aborts a process that leaves mid-connection, so all leave together
        import torch.distributed as dist
        from engine import distributed
        distributed.barrier()
        if llm.server is not None:
            llm.server.close()
        dist.destroy_process_group()
    elif llm.server is not None:
        llm.server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
