"""Expert-parallel dispatch + combine: latency and bandwidth per backend.

    torchrun --nproc-per-node 2 -m bench.all_to_all [--tokens 128,4096] [--hidden 7168] [--top-k 8]
             [--experts 256] [--dtype bf16] [--iters 5] [--backend torch]

Each rank routes its tokens to uniformly random experts (top-k distinct), then times dispatch and
combine separately (barrier before each, median of --iters). Bandwidth counts the bytes that leave
the rank (token rows sent to other ranks) per phase. On CPU this measures gloo over loopback.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from engine.ep import ExpertPlacement, make_all_to_all


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="torch")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ex = make_all_to_all(a.backend, ExpertPlacement.default(a.experts, world))
    g = torch.Generator().manual_seed(rank)
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, a.hidden, generator=g).to(dtype).to(dev)
        ids = torch.stack([torch.randperm(a.experts, generator=g)[:a.top_k] for _ in range(T)]).to(dev)
        w = torch.rand(T, a.top_k, generator=g).to(dev)
        t_disp, t_comb = [], []
        for _ in range(a.iters + 1):
            dist.barrier()
            t0 = time.perf_counter()
            (rx, rid, rw), works, h = ex.dispatch(x, ids, w)
            for wk in works:
                wk.wait()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            ex.combine(rx, h)
            if cuda:
                torch.cuda.synchronize()
            t_disp.append(t1 - t0)
            t_comb.append(time.perf_counter() - t2)
        sent = sum(c for r, c in enumerate(h.send_counts) if r != rank) * a.hidden * x.element_size()
        d, c = statistics.median(t_disp[1:]), statistics.median(t_comb[1:])
        rows.append((T, d, c, sent))
    if rank == 0:
        print(f"{a.backend} all-to-all, {world} ranks ({'NCCL' if cuda else 'gloo, CPU'}), hidden {a.hidden}, "
              f"top-{a.top_k} of {a.experts} experts, {a.dtype}; medians of {a.iters}")
        print(f"{'tokens/rank':>11s} {'dispatch ms':>12s} {'combine ms':>11s} {'MB sent':>9s} "
              f"{'dispatch GB/s':>14s} {'combine GB/s':>13s}")
        for T, d, c, sent in rows:
            print(f"{T:11d} {d * 1e3:12.2f} {c * 1e3:11.2f} {sent / 1e6:9.1f} {sent / d / 1e9:14.2f} "
                  f"{sent / c / 1e9:13.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
