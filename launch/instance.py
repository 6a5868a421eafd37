"""One instance (one DP+EP lockstep group, its own torchrun world) of a global scheduler service.

    STAGGER_SECRET_FILE=/path/secret torchrun --nproc-per-node N -m launch.instance \
        --scheduler 127.0.0.1:7000 --model DIR [-o kv_block_size=16 -o max_num_seqs=8 ...]

It registers (rank count, role, KV capacity), takes work at every step boundary and reports what
each step produced, until it is drained: SIGTERM (or SIGINT) makes it take no new work, finish what
it runs and leave. If it dies instead, the scheduler presumes it dead after a bounded silence and
re-queues its requests (engine/instances.py).
"""
import argparse
import json
import os
import signal

from engine import LLM


def parse_options(pairs) -> dict:
    """-o key=value (value read as JSON when it parses: numbers, true/false, objects)."""
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"engine option {p!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheduler", required=True, help="the global scheduler's HOST:PORT")
    ap.add_argument("--model", required=True)
    ap.add_argument("--role", default="mixed", choices=("mixed", "prefill", "decode"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("-o", "--option", action="append", help="engine option key=value (engine/config.py)")
    a = ap.parse_args(argv)
    llm = LLM(a.model, dtype=a.dtype, scheduler_address=a.scheduler, role=a.role, **parse_options(a.option))
    rank = int(os.environ.get("RANK", 0))
    remote = llm.engine.planner
    if remote is not None:
        print(f"stagger instance {remote.instance}: ranks {remote.ranks}", flush=True)
    leave = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: leave.append(True))
    drained = False
    while not llm.engine.stopped:
        llm.engine.step()
        if leave and not drained and rank == 0:   # outside the handler: the channel has a lock
            llm.drain()
            drained = True
    llm.close()
    if rank == 0:
        print("stagger instance: drained, leaving", flush=True)
    if llm.topology.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
