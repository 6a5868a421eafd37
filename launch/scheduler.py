"""The global scheduler as its own service: the single SBS buffer and the request registry that
instances (`launch.instance`, each its own torchrun job) register with and clients submit to.

    STAGGER_SECRET_FILE=/path/secret python -m launch.scheduler --listen 127.0.0.1:7000 --model DIR

The deployment secret comes from $STAGGER_SECRET_FILE or $STAGGER_SECRET (never the command line).
Loopback by default; give --listen 0.0.0.0:PORT to serve other hosts. The model folder is read for its
config and tokenizer only (validation, text prompts): no weights are loaded here.
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
    cfg = EngineConfig.from_options(scheduler=a.scheduler, scheduler_options=json.loads(a.scheduler_options),
                                    kv_block_size=a.kv_block_size)
    if cfg.scheduler == "adp-balance":
        raise SystemExit("adp-balance splits a fixed world into equal instances: it cannot serve instances "
                         "that come and go; use sbs, immediate-rr or immediate-lb")
    mc = load_config(a.model)
    max_len = a.max_model_len or mc.max_position_embeddings
    if a.decode_ranks < 0 or a.decode_ranks >= a.capacity:
        raise SystemExit(f"--decode-ranks must be in [0, --capacity={a.capacity})")
    coord = Coordinator(mc, cfg, load_tokenizer(a.model), max_len, None, a.capacity, a.decode_ranks)
    coord.closed = False   # a service: instances keep serving until they drain
    return SchedulerServer(coord, channel.parse_address(a.listen), channel.load_secret(), a.capacity,
                           dead_after_s=a.dead_after)


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
    server.close()


if __name__ == "__main__":
    main()
