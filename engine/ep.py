"""Expert parallelism: which rank holds which expert, and the all-to-all exchange of each MoE layer.

Dispatch sends every (token, choice) to the rank that owns the chosen expert; the owner runs its
local experts on what it received; combine sends the weighted results back, where each token sums
its choices. A rank with no tokens still takes part, so the collectives of all ranks match.

Two backends share one driver (`_Exchange.run`): `torch` (all_to_all_single, gloo or NCCL) and
`deepep` (DeepEP's normal kernels for prefill and mixed steps, its low-latency kernels for steps
that decode everywhere). With `micro_batches=2` (two-batch overlap) a layer's tokens go out in two
halves: the second half's dispatch and the first half's combine are on the wire while the other
half runs its experts.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scheduler.expert_placement import Placement, default_placement


class ExpertPlacement:
    """Logical expert -> physical slots (rank * S + slot), from a scheduler.expert_placement.Placement.

    A token's choice of logical expert e goes to one of e's replicas, picked by (token + choice)
    mod the replica count: deterministic, and it spreads a hot expert's tokens over its copies."""

    def __init__(self, placement: Placement, num_experts: int):
        self.placement, self.num_experts = placement, num_experts
        self.world_size, self.slots_per_rank = placement.world_size, placement.slots_per_rank
        reps = placement.replicas(num_experts)
        if any(not r for r in reps):
            missing = [e for e, r in enumerate(reps) if not r]
            raise ValueError(f"placement leaves expert(s) {missing} without a slot")
        width = max(len(r) for r in reps)
        self.replicas = torch.tensor([r + [r[0]] * (width - len(r)) for r in reps], dtype=torch.int64)
        self.num_replicas = torch.tensor([len(r) for r in reps], dtype=torch.int64)
        self._on = {}   # device -> (replicas, num_replicas): copied once, not once per layer call

    @classmethod
    def default(cls, num_experts: int, world_size: int, num_redundant: int = 0) -> "ExpertPlacement":
        return cls(default_placement(num_experts, world_size, num_redundant), num_experts)

    def local_experts(self, rank: int) -> list[int]:
        """Logical expert of each of this rank's slots, in slot order."""
        return list(self.placement.slots[rank])

    def physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, k] logical ids -> [T, k] physical slot ids."""
        dev = topk_ids.device
        if dev not in self._on:
            self._on[dev] = (self.replicas.to(dev), self.num_replicas.to(dev))
        reps, n = self._on[dev]
        T, k = topk_ids.shape
        pick = (torch.arange(T, device=dev)[:, None] + torch.arange(k, device=dev)) % n[topk_ids]
        return reps[topk_ids, pick]


def _halves(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous ranges over n rows (some may be empty: every rank runs as many parts)."""
    step = -(-n // parts) if n else 0
    return [(min(i * step, n), min((i + 1) * step, n)) for i in range(parts)]


class _Exchange:
    """dispatch -> local experts -> combine, over `micro_batches` parts of the layer's tokens.
    Subclasses give _begin (post the dispatch), _compute (wait for it, run experts) and
    _combine (post the combine; returns a callable that yields the combined rows)."""
    micro_batches = 1

    def run(self, x, topk_ids, topk_weights, experts, overlap=None):
        """Returns (routed output, overlap()). `overlap()` (the shared experts) runs while the
        first dispatch is on the wire."""
        parts = _halves(x.shape[0], self.micro_batches)
        started = [self._begin(x[a:b], topk_ids[a:b], topk_weights[a:b]) for a, b in parts]
        side = overlap() if overlap is not None else None
        pending = [self._combine(s, self._compute(s, experts)) for s in started]
        outs = [p() for p in pending]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), side


@dataclass
class DispatchHandle:
    token: torch.Tensor          # [P] token index of each (token, destination rank) pair, sorted by rank
    dest: torch.Tensor           # [P] destination rank of each pair
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


class TorchAllToAll(_Exchange):
    """`all_to_all_single` with uneven splits (gloo and NCCL).

    A token travels once to each rank that holds any of its k chosen experts (not once per
    choice), carrying a [k] row of local slot ids (-1 where the choice lives elsewhere) and
    weights; the receiver's experts sum that token's local choices, so combine returns one
    partial sum per (token, rank) pair. One host sync per dispatch: the split sizes."""

    def __init__(self, placement: ExpertPlacement, group=None, micro_batches: int = 1):
        self.placement, self.group, self.micro_batches = placement, group, micro_batches

    def _a2a(self, t: torch.Tensor, recv_counts, send_counts, async_op: bool = False):
        """One uneven all-to-all; with async_op, returns (result, work) to wait on later."""
        out = t.new_empty((sum(recv_counts),) + tuple(t.shape[1:]))
        src = t
        if t.dtype == torch.float8_e4m3fn:   # collectives reject float8: move the bytes
            src, out = t.view(torch.uint8), out.view(torch.uint8)
        work = dist.all_to_all_single(out, src.contiguous(), recv_counts, send_counts, group=self.group,
                                      async_op=async_op)
        out = out.view(t.dtype) if t.dtype == torch.float8_e4m3fn else out
        return (out, work) if async_op else out

    def _begin(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Dispatch -> ([received tokens [M, H], local slot ids [M, k] (-1: not here), weights [M, k]],
        works to wait on before using them, handle)."""
        T = topk_ids.shape[0]
        W, S = self.placement.world_size, self.placement.slots_per_rank
        phys = self.placement.physical(topk_ids)                       # [T, k]
        dest = phys // S
        hit = torch.zeros(T, W, dtype=torch.bool, device=x.device)
        hit.scatter_(1, dest, True)
        send = hit.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_counts, recv_counts = torch.stack([send, recv]).tolist()  # the one host sync
        # (token, rank) pairs rank-major without nonzero(): the hits sort first, their number is known
        flat = (~hit).t().flatten().to(torch.uint8)
        pair = torch.argsort(flat, stable=True)[:sum(send_counts)]
        rank, token = pair // T, pair % T
        mine = dest[token] == rank[:, None]                            # [P, k] choices served there
        slots = torch.where(mine, phys[token] % S, torch.full_like(phys[token], -1))
        w = topk_weights[token].float()
        weights = torch.where(mine, w, torch.zeros_like(w))
        # the three payloads travel together; whoever calls dispatch may compute meanwhile
        sent = [self._a2a(t, recv_counts, send_counts, async_op=True) for t in (x[token], slots, weights)]
        handle = DispatchHandle(token, rank, send_counts, recv_counts, T)
        return [out for out, _ in sent], [work for _, work in sent], handle

    def _combine(self, started, y):
        """Partial sums (already weighted) back to their tokens, summed over ranks."""
        h = started[2]
        back, work = self._a2a(y, h.send_counts, h.recv_counts, async_op=True)

        def done():
            work.wait()
            per_rank = y.new_zeros(h.num_tokens, self.placement.world_size, y.shape[1])
            per_rank[h.token, h.dest] = back
            return per_rank.sum(1)
        return done

    def _compute(self, started, experts):
        (rx, rid, rw), works, _ = started
        for w in works:
            w.wait()
        return experts.compute(rx, rid, rw)


# ---- DeepEP -------------------------------------------------------------------------------------

def _import_deep_ep():
    try:
        import deep_ep
    except ImportError as e:
        raise RuntimeError("all_to_all_backend='deepep' needs the deep_ep package (DeepEP, "
                           "github.com/deepseek-ai/DeepEP, built against NVSHMEM), which is not importable "
                           f"here ({e}); use all_to_all_backend='torch'") from None
    missing = [a for a in ("Buffer", "Config") if not hasattr(deep_ep, a)]
    calls = ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
             "clean_low_latency_buffer", "get_low_latency_rdma_size_hint")
    missing += [m for m in calls if not hasattr(getattr(deep_ep, "Buffer", None), m)]
    if missing:
        raise RuntimeError(f"the installed deep_ep lacks {missing} (it needs DeepEP's Buffer API with "
                           "normal and low-latency kernels); use all_to_all_backend='torch'")
    return deep_ep


def deepep_buffer_bytes(deep_ep, num_ranks: int, hidden: int, num_experts: int, capacity: int,
                        low_latency: bool) -> tuple[int, int]:
    """(NVL bytes, RDMA bytes) as DeepEP's own hints size them: the larger of the dispatch and
    combine configs' hints for bf16 rows, and the low-latency hint for `capacity` tokens per rank."""
    B = deep_ep.Buffer
    try:
        configs = (B.get_dispatch_config(num_ranks), B.get_combine_config(num_ranks))
    except AssertionError:
        raise RuntimeError(f"DeepEP's normal kernels have no config for an EP group of {num_ranks} ranks "
                           "(they run on 2, 4 or 8 ranks per node, or multiples of 8 across nodes)") from None
    hidden_bytes = hidden * 2   # DeepEP moves bf16 rows (FP8 rows and their scales fit in the same)
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    if low_latency:
        rdma = max(rdma, B.get_low_latency_rdma_size_hint(capacity, hidden, num_ranks, num_experts))
    return nvl, rdma


# hidden sizes DeepEP's low-latency kernels are compiled for (SWITCH_HIDDEN in csrc/kernels/legacy/launch.cuh)
_LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)


def low_latency_hidden_ok(deep_ep, hidden: int) -> bool:
    """A deep_ep module may list its own sizes (LOW_LATENCY_HIDDEN_SIZES; None: any multiple of 128)."""
    sizes = getattr(deep_ep, "LOW_LATENCY_HIDDEN_SIZES", _LL_HIDDEN)
    return hidden % 128 == 0 and (sizes is None or hidden in sizes)


def _fp8_rows(x: torch.Tensor):
    """[T, H] -> (e4m3 [T, H], fp32 scales [T, H // 128]), one scale per token and 128 channels."""
    T, H = x.shape
    g = x.float().view(T, H // 128, 128)
    scale = g.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (g / scale[..., None]).to(torch.float8_e4m3fn).view(T, H), scale


def _unfp8(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """Inverse of _fp8_rows over the last dimension (any leading shape; scales may be strided)."""
    H = q.shape[-1]
    g = q.float().reshape(*q.shape[:-1], H // 128, 128) * scale.reshape(*q.shape[:-1], H // 128, 1)
    return g.reshape(q.shape).to(dtype)


class DeepEPComm:
    """One deep_ep.Buffer per EP group, shared by every MoE layer, and the mode of the current step.

    capacity: tokens per rank a low-latency dispatch can carry (all ranks hold the same value; the
    engine uses max_num_seqs, which bounds a decode-only step). Low-latency mode needs a hidden size
    DeepEP compiled its kernels for (otherwise every step uses the normal kernels); FP8 payloads
    need a multiple of 512 there (128 in normal mode)."""

    def __init__(self, group, num_ranks: int, num_experts: int, hidden: int, capacity: int,
                 fp8: bool = True, deep_ep=None):
        self.deep_ep = deep_ep or _import_deep_ep()
        self.num_experts, self.hidden = num_experts, hidden
        self.capacity = -(-capacity // 4) * 4        # DeepEP's TMA wants ranks * capacity % 4 == 0
        self.low_latency_ok = low_latency_hidden_ok(self.deep_ep, hidden)
        self.fp8_normal, self.fp8_ll = fp8 and hidden % 128 == 0, fp8 and hidden % 512 == 0
        nvl, rdma = deepep_buffer_bytes(self.deep_ep, num_ranks, hidden, num_experts, self.capacity,
                                        self.low_latency_ok)
        group = group if group is not None else dist.group.WORLD
        self.buffer = self.deep_ep.Buffer(group, nvl, rdma, low_latency_mode=self.low_latency_ok,
                                          num_qps_per_rank=max(1, num_experts // num_ranks))
        self.low_latency = False      # this step: decode everywhere (set at each step boundary)
        self._normal_used = False     # normal kernels ran since the low-latency buffer was cleaned

    def set_mode(self, decode_only: bool) -> None:
        ll = decode_only and self.low_latency_ok
        if ll and self._normal_used:   # DeepEP: clean after normal kernels, before low-latency ones
            self.buffer.clean_low_latency_buffer(self.capacity, self.hidden, self.num_experts)
            self._normal_used = False
        self.low_latency = ll


class DeepEPAllToAll(_Exchange):
    """DeepEP behind the exchange. Physical slot ids are DeepEP's expert ids (rank r holds experts
    r*S .. r*S+S-1), so EPLB's replicas need nothing special.

    Normal mode: layout, then dispatch of each token once per destination rank with its top-k
    (local index or -1) and weights; local experts sum their weighted choices; combine sums per
    token. Low-latency mode: one message per (token, expert) into the packed
    [S, capacity * ranks, H] layout; experts run on every slot row below its count (a mask, no host
    sync) without weights; the combine applies the weights."""

    def __init__(self, placement: ExpertPlacement, comm: DeepEPComm, micro_batches: int = 1):
        self.placement, self.comm, self.micro_batches = placement, comm, micro_batches

    def _begin(self, x, topk_ids, topk_weights):
        phys = self.placement.physical(topk_ids)
        buf, c = self.comm.buffer, self.comm
        if c.low_latency:
            if x.shape[0] > c.capacity:
                raise RuntimeError(f"a low-latency step got {x.shape[0]} tokens on one rank, over the "
                                   f"capacity {c.capacity} (max_num_seqs): the step plan said decode-only")
            recv, counts, handle, _, hook = buf.low_latency_dispatch(
                x.contiguous(), phys.contiguous(), c.capacity, c.num_experts, use_fp8=c.fp8_ll,
                return_recv_hook=True)
            return ("ll", recv, counts, handle, hook, phys, topk_weights.float().contiguous(), x.dtype)
        c._normal_used = True
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(phys, c.num_experts)
        payload = _fp8_rows(x) if c.fp8_normal else x.contiguous()
        # async_finish: the kernels run on DeepEP's stream; the compute stream waits on the event only
        # when this part's experts start, so another part's work overlaps the transfer
        recv, ridx, rw, _, handle, event = buf.dispatch(
            payload, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=phys,
            topk_weights=topk_weights.float().contiguous(), async_finish=True)
        return ("normal", recv, ridx, rw, handle, x.dtype, event)

    def _compute(self, s, experts):
        if s[0] == "normal":
            _, recv, ridx, rw, _, dtype, event = s
            event.current_stream_wait()
            rx = _unfp8(*recv, dtype) if isinstance(recv, tuple) else recv
            return experts.compute(rx, ridx, rw)
        _, recv, counts, _, hook, _, _, dtype = s
        hook()   # the data has arrived only now
        rx = _unfp8(*recv, dtype) if isinstance(recv, tuple) else recv.to(dtype)
        S, N, H = rx.shape
        row = torch.arange(N, device=rx.device)
        valid = row[None] < counts[:, None].to(row.device)
        slot = torch.where(valid, torch.arange(S, device=rx.device)[:, None], -1)
        y = experts.compute(rx.reshape(S * N, H), slot.reshape(-1, 1), torch.ones(S * N, 1, device=rx.device))
        return y.view(S, N, H).contiguous()

    def _combine(self, s, y):
        buf = self.comm.buffer
        if s[0] == "normal":
            out, _, event = buf.combine(y.contiguous(), s[4], async_finish=True)
            wait = event.current_stream_wait
        else:
            _, _, _, handle, _, phys, w, _ = s
            out, _, wait = buf.low_latency_combine(y, phys.contiguous(), w, handle, return_recv_hook=True)

        def done():
            wait()
            return out
        return done


def set_step_mode(model, decode_only: bool) -> None:
    """At a step boundary: tell the layers' exchanges whether every rank of the group only decodes
    this step (the same flag on every rank, from the broadcast plan)."""
    for layer in model.moe_layers():
        comm = getattr(layer.ep, "comm", None)
        if comm is not None:
            comm.set_mode(decode_only)
            return   # one comm per group, shared by the layers


def make_all_to_all(backend: str, placement: ExpertPlacement, group=None, micro_batches: int = 1, comm=None):
    """comm: a DeepEPComm shared by the layers of one model (backend 'deepep')."""
    if micro_batches not in (1, 2):
        raise ValueError(f"micro_batches must be 1 or 2, got {micro_batches}")
    if backend == "torch":
        return TorchAllToAll(placement, group, micro_batches)
    if backend == "deepep":
        if comm is None:
            raise ValueError("the deepep backend needs a DeepEPComm (engine.ep) shared by the layers")
        return DeepEPAllToAll(placement, comm, micro_batches)
    raise ValueError(f"unknown all-to-all backend {backend!r} (expected torch or deepep)")
