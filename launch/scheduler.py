"""The global scheduler as its own service: the single SBS buffer and the request registry that
instances (`launch.instance`, each its own torchrun job) register with and clients submit to.

    STAGGER_SECRET_FILE=/path/secret python -m launch.scheduler --listen 127.0.0.1:7000 --model DIR

The deployment secret comes from $STAGGER_SECRET_FILE or $STAGGER_SECRET (never the command line).
Loopback by default; give --listen 0.0.0.0:PORT to serve other hosts. The model folder is read for its
config and tokenizer only (validation, text prompts): no weights are loaded here.
The same service runs inside the HTTP server with `python -m launch.serve --scheduler-listen
HOST:PORT` (make_server is shared).
"""
import argparse
import json
import signal
import threading

from engine import channel
from engine.config import EngineConfig
from engine.coordinator import Coordinator
from engine.instances import SchedulerServer
from model.config import load_config
from model.tokenizer import load_tokenizer


def build(a) -> SchedulerServer:
    return make_server(a.model, a.listen, scheduler=a.scheduler,
                       scheduler_options=json.loads(a.scheduler_options), kv_block_size=a.kv_block_size,
                       max_model_len=a.max_model_len, capacity=a.capacity,
                       decode_ranks=a.decode_ranks, dead_after_s=a.dead_after)


def make_server(model: str, listen: str, *, scheduler: str = "sbs", scheduler_options: dict | None = None,
                kv_block_size: int = 64, max_model_len: int | None = None, capacity: int = 256,
                decode_ranks: int = 0, dead_after_s: float = 10.0) -> SchedulerServer:
    """The global scheduler service, not started (also hosted by `launch.serve --scheduler-listen`).
    Reads the model folder's config and tokenizer; the secret from the environment."""
    cfg = EngineConfig.from_options(scheduler=scheduler, scheduler_options=scheduler_options or {},
                                    kv_block_size=kv_block_size)
    if cfg.scheduler == "adp-balance":
        raise SystemExit("adp-balance splits a fixed world into equal instances: it cannot serve instances "
                         "that come and go; use sbs, immediate-rr or immediate-lb")
    mc = load_config(model)
    max_len = max_model_len or mc.max_position_embeddings
    if decode_ranks < 0 or decode_ranks >= capacity:
        raise SystemExit(f"decode ranks ({decode_ranks}) must be in [0, capacity={capacity})")
    coord = Coordinator(mc, cfg, load_tokenizer(model), max_len, None, capacity, decode_ranks)
    coord.closed = False   # a service: instances keep serving until they drain
    return SchedulerServer(coord, channel.parse_address(listen), channel.load_secret(), capacity,
                           dead_after_s=dead_after_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:7000", help="HOST:PORT (port 0: any free port)")
    ap.add_argument("--model", required=True, help="checkpoint folder (config and tokenizer)")
    ap.add_argument("--scheduler", default="sbs")
    ap.add_argument("--scheduler-options", default="{}", help="JSON object")
    ap.add_argument("--kv-block-size", type=int, default=64)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--capacity", type=int, default=256, help="scheduler rank ids over the service's life")
    ap.add_argument("--decode-ranks", type=int, default=0,
                    help="P/D: the last K rank ids are for decode instances (0: mixed instances)")
    ap.add_argument("--dead-after", type=float, default=10.0, help="seconds of silence before an instance "
                    "is presumed dead")
    a = ap.parse_args(argv)
    server = build(a)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    host, port = server.address
    print(f"stagger scheduler listening on {host}:{port}", flush=True)
    while not stop.wait(0.5):
        server.check()
        with server.lock:   # nobody reads step records here: keep none (a service runs for days)
            server.coordinator.take_steps()
    server.close()


if __name__ == "__main__":
    main()
