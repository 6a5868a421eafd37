"""Expert-parallel dispatch + combine: latency and bandwidth per backend.

    torchrun --nproc-per-node 2 -m bench.all_to_all [--tokens 128,4096] [--hidden 7168] [--top-k 8]
             [--experts 256] [--dtype bf16] [--iters 5] [--backend torch|deepep]
             [--mode normal|low-latency] [--fp8] [--micro-batches 1|2]

Each rank routes its tokens to uniformly random experts (top-k distinct), then times dispatch and
combine separately (barrier before each, median of --iters), through the same calls the MoE layer
makes (engine.ep). Bandwidth counts the bytes that leave the rank per phase: token rows sent to
other ranks (once per destination rank in normal mode, once per expert in low-latency mode).
On CPU this measures gloo over loopback. `--backend deepep` needs DeepEP (several GPUs with
NVLink/RDMA); on CPU only its test emulation runs (PYTHONPATH=tests/deep_ep_emul), whose timings
say nothing about DeepEP.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from engine.ep import DeepEPComm, ExpertPlacement, _halves, make_all_to_all


class _Identity:   # "experts" that return what arrived: the timings are the exchange's
    @staticmethod
    def compute(rx, slot_ids, rw):
        return rx


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="torch", choices=["torch", "deepep"])
    ap.add_argument("--mode", default="normal", choices=["normal", "low-latency"],
                    help="deepep: normal kernels (prefill) or low-latency kernels (decode-only steps)")
    ap.add_argument("--fp8", action="store_true", help="deepep: FP8 dispatch payloads")
    ap.add_argument("--micro-batches", type=int, default=1, choices=[1, 2])
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    placement = ExpertPlacement.default(a.experts, world)
    tokens = [int(t) for t in a.tokens.split(",")]
    comm = None
    if a.backend == "deepep":
        comm = DeepEPComm(None, world, a.experts, a.hidden, max(tokens), a.fp8)
        comm.set_mode(a.mode == "low-latency")
        if a.mode == "low-latency" and not comm.low_latency:
            raise SystemExit(f"low-latency mode needs a hidden size divisible by 128, got {a.hidden}")
    ex = make_all_to_all(a.backend, placement, None, a.micro_batches, comm)
    g = torch.Generator().manual_seed(rank)
    rows = []
    for T in tokens:
        x = torch.randn(T, a.hidden, generator=g).to(dtype).to(dev)
        ids = torch.stack([torch.randperm(a.experts, generator=g)[:a.top_k] for _ in range(T)]).to(dev)
        w = torch.rand(T, a.top_k, generator=g).to(dev)
        t_disp, t_comb = [], []
        for _ in range(a.iters + 1):
            dist.barrier()
            t0 = time.perf_counter()
            started = [ex._begin(x[i:j], ids[i:j], w[i:j]) for i, j in _halves(T, a.micro_batches)]
            ys = [ex._compute(s, _Identity) for s in started]   # waits for the data
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            for s, y in zip(started, ys):
                ex._combine(s, y)()
            if cuda:
                torch.cuda.synchronize()
            t_disp.append(t1 - t0)
            t_comb.append(time.perf_counter() - t2)
        dest = placement.physical(ids.cpu()) // placement.slots_per_rank
        if a.mode == "low-latency":
            pairs = int((dest != rank).sum())                     # one message per (token, expert)
        else:
            hit = torch.zeros(T, world, dtype=torch.bool).scatter_(1, dest, True)
            pairs = int(hit.sum() - hit[:, rank].sum())           # once per (token, other rank)
        row_bytes = a.hidden * (1 if a.fp8 and a.backend == "deepep" else x.element_size())
        sent = pairs * row_bytes
        d, c = statistics.median(t_disp[1:]), statistics.median(t_comb[1:])
        rows.append((T, d, c, sent))
    if rank == 0:
        what = a.backend + (f" ({a.mode}{', fp8' if a.fp8 else ''})" if a.backend == "deepep" else "")
        print(f"{what} all-to-all, {world} ranks ({'NCCL' if cuda else 'gloo, CPU'}), hidden {a.hidden}, "
              f"top-{a.top_k} of {a.experts} experts, {a.dtype}; medians of {a.iters}")
        print(f"{'tokens/rank':>11s} {'dispatch ms':>12s} {'combine ms':>11s} {'MB sent':>9s} "
              f"{'dispatch GB/s':>14s} {'combine GB/s':>13s}")
        for T, d, c, sent in rows:
            print(f"{T:11d} {d * 1e3:12.2f} {c * 1e3:11.2f} {sent / 1e6:9.1f} {sent / d / 1e9:14.2f} "
                  f"{sent / c / 1e9:13.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
