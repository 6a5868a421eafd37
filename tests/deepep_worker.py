"""Run under torchrun by tests/test_deepep.py with tests/deep_ep_emul on PYTHONPATH (the emulated
deep_ep): `torchrun --nproc-per-node N tests/deepep_worker.py MODE OUT [MODEL]`."""
import json
import sys

import torch
import torch.distributed as dist


def _experts(slots):
    class Experts:   # expert e multiplies by (e + 1): the combined result is known in closed form
        seen = []

        @staticmethod
        def compute(rx, slot_ids, rw):   # [M, k] local slots (-1: not here) and weights
            Experts.seen.append(int((slot_ids >= 0).any(1).sum()))
            logical = torch.tensor(slots)[slot_ids.clamp(min=0)]
            scale = torch.where(slot_ids >= 0, (logical.float() + 1) * rw, torch.zeros_like(rw))
            return rx * scale.sum(1, keepdim=True).to(rx.dtype)
    return Experts


def api(out_prefix):
    """The emulated deep_ep calls themselves: layout, handle reuse, low-latency packing, FP8."""
    import deep_ep
    g = dist.group.WORLD
    rank, W, L, k, H = dist.get_rank(), dist.get_world_size(), 2, 2, 128
    E = W * L
    T = [5, 0, 3][rank]
    gen = torch.Generator().manual_seed(rank)
    idx = torch.zeros(0, k, dtype=torch.int64)
    if T:
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if T:
        idx[0, 1] = -1                                          # a choice that selects nothing
    x = torch.arange(T, dtype=torch.float32)[:, None].repeat(1, H) + 1000 * rank
    w = torch.rand(T, k, generator=gen)
    buf = deep_ep.Buffer(g, 1 << 30, 1 << 30, low_latency_mode=True, num_qps_per_rank=L)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    all_idx = [None] * W
    dist.all_gather_object(all_idx, idx)
    res = {"rdma_none": per_rdma is None,
           "per_rank": per_rank.tolist() == [int(((idx // L) == r).any(1).sum()) for r in range(W)],
           "per_expert": per_expert.tolist() == [int((idx == e).sum()) for e in range(E)],
           "in_rank": bool((in_rank == torch.stack([((idx // L) == r).any(1) for r in range(W)], 1)).all())}
    recv, ridx, rw, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w)
    # what should arrive: from each source rank in rank order, its tokens that touch me, in token order
    want_src, want_idx = [], []
    for s, ids in enumerate(all_idx):
        for t in range(ids.shape[0]):
            if ((ids[t] >= 0) & (ids[t] // L == rank)).any():
                want_src.append(1000 * s + t)
                loc = torch.where((ids[t] >= 0) & (ids[t] // L == rank), ids[t] - rank * L, -1)
                want_idx.append(loc.tolist())
    res["recv_order"] = recv[:, 0].tolist() == [float(v) for v in want_src]
    res["recv_topk_idx"] = ridx.tolist() == want_idx
    res["zero_weight_elsewhere"] = bool((rw[ridx < 0] == 0).all())
    res["counts"] = counts == [sum(row.count(e) for row in want_idx) for e in range(L)]
    again, *nothing, _ = buf.dispatch(x * 2, handle=handle)             # cached layout
    res["cached_dispatch"] = torch.equal(again, recv * 2) and nothing == [None, None, None, None]
    back, _, _ = buf.combine(recv, handle)                              # unweighted sum per token
    touched = torch.stack([((idx >= 0) & (idx // L == r)).any(1) for r in range(W)], 1).sum(1)
    res["combine"] = torch.equal(back, x * touched[:, None].float()) if T else back.shape == (0, H)
    try:
        buf.low_latency_dispatch(x, idx, 8, E, use_fp8=False)
        res["dirty_caught"] = False
    except RuntimeError:
        res["dirty_caught"] = True
    buf.clean_low_latency_buffer(8, H, E)
    for fp8 in (False, True):
        Hx = 512 if fp8 else H
        xx = x[:, :1].repeat(1, Hx) + torch.linspace(0, 1, Hx)
        packed, cnt, hd, _, hook = buf.low_latency_dispatch(xx, idx, 8, E, use_fp8=fp8, return_recv_hook=True)
        hook()
        px = packed[0].float() * packed[1].repeat_interleave(128, dim=2) if fp8 else packed
        ok = list(packed[0].shape if fp8 else packed.shape) == [L, 8 * W, Hx]
        if fp8:
            ok &= packed[1].shape == (L, 8 * W, Hx // 128) and packed[1].stride(1) == 1   # column-major
        for le in range(L):
            e = rank * L + le
            n = int(cnt[le])
            ok &= n == sum(int((ids == e).sum()) for ids in all_idx)
            src = []
            for s, ids in enumerate(all_idx):
                begin, c = int(hd[1][le, s]) >> 32, int(hd[1][le, s]) & 0xFFFFFFFF
                toks = [t for t in range(ids.shape[0]) if (ids[t] == e).any()]
                ok &= c == len(toks) and hd[0][le, begin:begin + c].tolist() == toks
                src += [1000 * s + t for t in toks]
            tol = 0.07 * (max(src) + 1) if src and fp8 else 0
            if n:
                ok &= bool(((px[le, :n, 0] - torch.tensor(src, dtype=torch.float32)).abs() <= tol).all())
        y = (px if fp8 else packed).float().contiguous()
        comb, _, _ = buf.low_latency_combine(y, idx, w, hd)
        want = (xx * (w * (idx >= 0)).sum(1, keepdim=True)) if T else xx
        err = float(((comb - want).abs() / want.abs().clamp(min=1)).max()) if T else 0.0
        res[f"ll_fp8_{fp8}"] = bool(ok) and err < (0.07 if fp8 else 1e-6)
    json.dump(res, open(f"{out_prefix}.api.{rank}.json", "w"))


def a2a(out_prefix):
    """deepep backend (emulated) against the torch backend and the closed form; then api()."""
    from engine.ep import (
        DeepEPComm,
        ExpertPlacement,
        _fp8_rows,
        _unfp8,
        make_all_to_all,
    )
    from scheduler.expert_placement import Placement
    dist.init_process_group("gloo")
    rank, W, E, k = dist.get_rank(), dist.get_world_size(), 6, 3
    # uneven ownership, and experts 1 and 4 have a copy on each rank
    slots = [[0, 3, 1, 4], [2, 1, 4, 5], [5, 0, 2, 3]][:W]
    placement = ExpertPlacement(Placement(slots), E)
    S = len(slots[0])
    results = []
    for H, fp8 in ((128, False), (512, True)):
        comm = DeepEPComm(None, W, W * S, H, capacity=8, fp8=fp8)
        for mb in (1, 2):
            ref = make_all_to_all("torch", placement, None, mb)
            ex = make_all_to_all("deepep", placement, None, mb, comm)
            for case, n_tokens in enumerate([(7, 3, 5), (0, 4, 2), (5, 0, 0), (0, 0, 0)]):
                for decode_only in (False, True):
                    comm.set_mode(decode_only)
                    T = n_tokens[rank]
                    g = torch.Generator().manual_seed(100 * case + rank)
                    x = torch.randn(T, H, generator=g)
                    ids = (torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T
                           else torch.zeros(0, k, dtype=torch.int64))
                    w = torch.rand(T, k, generator=g)
                    Ex = _experts(placement.local_experts(rank))
                    out, side = ex.run(x, ids, w, Ex, overlap=lambda: 42)
                    want_out, _ = ref.run(x, ids, w, _experts(placement.local_experts(rank)))
                    xq = _unfp8(*_fp8_rows(x), x.dtype) if fp8 and T else x
                    want = (xq[:, None, :] * ((ids.float() + 1) * w)[..., None]).sum(1)
                    results.append({"H": H, "fp8": fp8, "mb": mb, "case": case, "ll": comm.low_latency,
                                    "side": side, "T": T, "shape_ok": list(out.shape) == [T, H],
                                    "err_closed": float((out - want).abs().max()) if T else 0.0,
                                    "err_torch": float((out - want_out).abs().max()) if T else 0.0,
                                    "received": sum(Ex.seen)})
        results.append({"stats": comm.buffer.stats})
    json.dump(results, open(f"{out_prefix}.{rank}.json", "w"))
    api(out_prefix)


def generate(out_prefix, model_dir, spec_file):
    """Greedy tokens of one checkpoint under several exchange settings, in one process."""
    from engine import LLM, SamplingParams
    spec = json.load(open(spec_file))
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    res = {}
    for name, extra in spec["variants"].items():
        llm = LLM(model_dir, **spec["options"], **extra)
        res[name] = [o.token_ids for o in llm.generate(spec["prompts"], params)]
        layer = llm.engine.worker.runner.model.moe_layers()[0]
        comm = getattr(layer.ep, "comm", None)
        if comm is not None:
            res[name + ":stats"] = comm.buffer.stats
        res[name + ":mb"] = layer.ep.micro_batches
        dist.barrier()
    json.dump(res, open(f"{out_prefix}.{dist.get_rank()}.json", "w"))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"a2a": a2a, "generate": generate}[mode](out, *sys.argv[3:])
    dist.barrier()
    dist.destroy_process_group()
