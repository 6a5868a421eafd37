"""An emulation of DeepEP's Python API on torch.distributed (gloo, CPU), for tests only.

It mirrors the `deep_ep.Buffer` surface of deepseek-ai/DeepEP (deep_ep/buffers/legacy.py, package
version 2.1.0; the V1 API the README documents): the same calls, keyword arguments, return tuples,
handle tuples and layouts, and the preconditions that shape how a caller must use them:
- normal mode: `get_dispatch_layout` -> (num_tokens_per_rank [W] int32, num_tokens_per_rdma_rank (None
  intranode), num_tokens_per_expert [E] int32, is_token_in_rank [T, W] bool, event); `dispatch` receives
  tokens grouped by source rank (rank order), each source's in token order, once per destination
  rank however many of its experts a token picked there; recv_topk_idx holds LOCAL expert indices,
  -1 where the choice lives on another rank (weight 0 there); a handle cached from one dispatch
  serves another dispatch (`handle=`) and the combine, which sums (unweighted) per source token.
- low-latency mode: packed [num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]
  receive layout with per-expert counts (rows past the count are garbage), FP8 e4m3 payloads with
  per-token, per-128-channel float scales (column-major view), `return_recv_hook` (data valid only
  after hook()), and a weighted combine; a buffer used by normal kernels must be cleaned
  (`clean_low_latency_buffer`) before the next low-latency kernel.
- buffer sizes: the Config hints and the low-latency RDMA hint use DeepEP's formulas, and calls
  check that the buffer given at construction is large enough.
Deviations (CPU emulation): events are synchronous; the data moves with all_to_all_single, so the
order inside one low-latency expert block is (source rank, token) where DeepEP's is arrival order;
fp32 payloads are accepted where DeepEP asserts bf16 (so CPU tests can compare token for token with
the fp32 torch backend); `DEEP_EP_EMUL_ANY_RANKS=1` lets normal mode run on rank counts that
DeepEP's config table lacks (e.g. 3; real DeepEP supports 2, 4, 8 intranode, multiples of 8 across).
"""
import os

import torch
import torch.distributed as dist

__version__ = "2.1.0-emulated"
EMULATED = True
topk_idx_t = torch.int64
# emulator extra (DeepEP has no such attribute; engine.ep reads it when present): DeepEP compiles its
# low-latency kernels for hidden 2048..8192 only; the emulator takes any multiple of 128 (tiny models)
LOW_LATENCY_HIDDEN_SIZES = None
_NUM_MAX_NVL_PEERS = 8
_ALIGN = 128   # DeepEP rounds its size hints to this many bytes


class EventHandle:
    def current_stream_wait(self) -> None:
        pass


class EventOverlap:
    """A CUDA event wrapper in DeepEP; here every kernel has already finished."""

    def __init__(self, event=None, extra_tensors=None):
        self.event, self.extra_tensors = event, extra_tensors

    def current_stream_wait(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Config:
    """DeepEP's performance config (SMs, chunk sizes) and its buffer-size hints (same formulas)."""

    def __init__(self, num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
                 num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens):
        assert num_sms >= 0 and 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens
        assert num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0
        send = num_max_rdma_chunked_send_tokens
        r = -(-num_max_rdma_chunked_recv_tokens // send) * send
        assert num_max_rdma_chunked_send_tokens <= r // 2
        self.num_sms, self.num_max_nvl_chunked_send_tokens = num_sms, num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens = send, r

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        assert num_ranks < _NUM_MAX_NVL_PEERS or num_ranks % _NUM_MAX_NVL_PEERS == 0
        rdma, nvl = max(num_ranks // _NUM_MAX_NVL_PEERS, 1), min(num_ranks, _NUM_MAX_NVL_PEERS)
        ch = self.num_sms // 2
        per_tok = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4   # data, source meta, top-k, scales
        n = ch * nvl * (2 * rdma + 3) * 4 + ch * nvl * self.num_max_nvl_chunked_recv_tokens * per_tok
        return -(-n // 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0
        assert num_ranks % _NUM_MAX_NVL_PEERS == 0
        rdma, ch = num_ranks // _NUM_MAX_NVL_PEERS, self.num_sms // 2
        per_tok = (hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4 + 16) * 2
        n = ch * rdma * ((_NUM_MAX_NVL_PEERS * 2 + 2) * 8 + self.num_max_rdma_chunked_recv_tokens * per_tok)
        return -(-n // 128) * 128


_DISPATCH_TABLE = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
                   24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
                   96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128),
                   160: (28, 720, 12, 128)}
_COMBINE_TABLE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
                  24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
                  96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def _table(table, num_ranks):
    if num_ranks not in table and os.environ.get("DEEP_EP_EMUL_ANY_RANKS") == "1":
        num_ranks = min(k for k in table if k >= num_ranks)
    assert num_ranks in table, f"Unsupported number of EP ranks: {num_ranks}"
    return Config(Buffer.num_sms, *table[num_ranks])


def _ll_layout_bytes(max_tokens, hidden, num_ranks, num_experts):
    scales = hidden // 128
    disp = 16 + max(hidden * 2, hidden + scales * 4)
    comb = scales * 4 + hidden * 2
    send = max(max_tokens * disp, num_experts * max_tokens * comb)
    recv = max(num_experts * max_tokens * disp, num_experts * max_tokens * comb)
    return 2 * send + 2 * recv + 2 * (-(-num_experts * 4 // 128) * 128)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False):
    """[T, H] -> (e4m3 [T, H], float scales [T, H // 128]): one scale per token and 128 channels."""
    T, H = x.shape
    amax = x.float().view(T, H // 128, 128).abs().amax(-1).clamp(min=1e-4)
    scale = amax / 448.0
    if round_scale:   # a power of two, as DeepEP's round_scale option
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (x.float().view(T, H // 128, 128) / scale[..., None]).to(torch.float8_e4m3fn)
    return q.view(T, H), scale


def _a2a(t: torch.Tensor, recv_splits, send_splits, group, async_op=False):
    """Uneven all_to_all_single of rows (any dtype: float8/bool travel as bytes)."""
    src = t.contiguous()
    if src.dtype in (torch.float8_e4m3fn, torch.bool):
        raw, back = src.view(torch.uint8), (lambda o: o.view(t.dtype))
    elif src.dtype == torch.int32:   # gloo moves int64
        raw, back = src.long(), (lambda o: o.to(torch.int32))
    else:
        raw, back = src, (lambda o: o)
    out = raw.new_empty((sum(recv_splits),) + tuple(raw.shape[1:]))
    work = dist.all_to_all_single(out, raw, list(recv_splits), list(send_splits), group=group,
                                  async_op=async_op)

    def result():
        if work is not None and async_op:
            work.wait()
        return back(out)
    return result if async_op else result()


class Buffer:
    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None) -> None:
        if group is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy = low_latency_mode, explicitly_destroy
        if low_latency_mode:
            assert num_qps_per_rank > 0
            self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        self._ll_dirty = False         # normal kernels ran since the last clean
        self._destroyed = False
        kinds = ("normal_dispatch", "normal_combine", "ll_dispatch", "ll_combine", "clean")
        self.stats = dict.fromkeys(kinds, 0)   # calls made, for tests

    # ---- static helpers ------------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return False

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        n = _ll_layout_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
        return (n + _ALIGN) // _ALIGN * _ALIGN

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return _table(_DISPATCH_TABLE, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return _table(_COMBINE_TABLE, num_ranks)

    def destroy(self) -> None:
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self._destroyed = True

    def get_comm_stream(self):
        raise RuntimeError("the deep_ep emulator has no CUDA streams")

    # ---- normal mode -----------------------------------------------------------------------------
    def _check_alive(self):
        assert not self._destroyed, "buffer destroyed"

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        self._check_alive()
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and num_experts > 0
        assert topk_idx.dtype == topk_idx_t
        W = self.group_size
        assert num_experts % W == 0
        L = num_experts // W
        T = topk_idx.shape[0]
        valid = topk_idx >= 0
        dest = torch.where(valid, topk_idx // L, torch.full_like(topk_idx, W))
        hit = torch.zeros(T, W + 1, dtype=torch.bool, device=topk_idx.device)
        hit.scatter_(1, dest, True)
        is_token_in_rank = hit[:, :W].contiguous()
        per_rank = is_token_in_rank.sum(0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
        per_rdma = None
        if W > _NUM_MAX_NVL_PEERS:
            nodes = is_token_in_rank.view(T, W // _NUM_MAX_NVL_PEERS, _NUM_MAX_NVL_PEERS)
            per_rdma = nodes.any(-1).sum(0).int()
        return per_rank, per_rdma, per_expert, is_token_in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        self._check_alive()
        W, me, g = self.group_size, self.rank, self.group
        config = self.get_dispatch_config(W) if config is None else config
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        assert x.dim() == 2 and x.is_contiguous() and (x.shape[1] * x.element_size()) % 16 == 0
        if x_scales is not None:
            assert x.element_size() == 1 and x_scales.dtype in (torch.float32, torch.int32)
            assert x_scales.dim() == 2 and x_scales.shape[0] == x.shape[0]
        else:
            assert x.dtype in (torch.bfloat16, torch.float32), "DeepEP dispatches bf16 (or an fp8 tuple)"
        T, H = x.shape
        self._check_nvl_bytes(config, H * 2)   # bf16 width (fp32 rows are the emulator's extra)
        self._ll_dirty = True
        self.stats["normal_dispatch"] += 1
        if handle is not None:   # cached: the layout of an earlier dispatch
            assert topk_idx is None and topk_weights is None
            rank_prefix, _, _, recv_src_idx, is_token_in_rank, _ = handle
            assert is_token_in_rank.shape == (T, W)
        else:
            assert num_tokens_per_rank is not None and is_token_in_rank is not None
            assert num_tokens_per_expert is not None
            assert is_token_in_rank.dtype == torch.bool and is_token_in_rank.shape == (T, W)
            assert num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_expert.dtype == torch.int32
            assert num_tokens_per_expert.numel() % W == 0
            assert (topk_idx is None) == (topk_weights is None)
            if topk_idx is not None:
                assert topk_idx.shape[0] == T and topk_weights.shape == topk_idx.shape
                assert topk_weights.dtype == torch.float32 and topk_idx.dtype == topk_idx_t
            # every rank learns the whole [W, W] send-count matrix (DeepEP's notify kernel)
            counts = torch.empty(W * W, dtype=torch.int64)   # (gloo gathers int64)
            gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
            gather(counts, num_tokens_per_rank.to(torch.int64).cpu().contiguous(), group=g)
            rank_prefix = counts.view(W, W).cumsum(0).to(torch.int32)
        send_splits = is_token_in_rank.sum(0).tolist()
        col = rank_prefix[:, me].tolist()
        recv_splits = [col[0]] + [col[i] - col[i - 1] for i in range(1, W)]
        token, rank = is_token_in_rank.t().nonzero(as_tuple=True)[::-1]    # rank-major, token order
        send_head = torch.full((T, W), -1, dtype=torch.int32)
        pos = torch.cat([torch.arange(n) for n in send_splits]) if T else torch.zeros(0, dtype=torch.int64)
        send_head[token, rank] = pos.to(torch.int32)
        recv_x = _a2a(x[token], recv_splits, send_splits, g)
        recv_scales = _a2a(x_scales[token], recv_splits, send_splits, g) if x_scales is not None else None
        src = _a2a(token.to(torch.int32), recv_splits, send_splits, g) if handle is None else recv_src_idx
        ch = config.num_sms // 2
        chan = torch.zeros(W, ch, dtype=torch.int32)
        chan[:, :] = torch.tensor(send_splits, dtype=torch.int32)[:, None]   # one channel carries all
        recv_chan = torch.zeros(W, ch, dtype=torch.int32)
        recv_chan[:, :] = torch.tensor(recv_splits, dtype=torch.int32)[:, None]
        out_x = (recv_x, recv_scales) if x_scales is not None else recv_x
        if handle is not None:
            return out_x, None, None, None, None, EventOverlap()
        new_handle = (rank_prefix, chan, recv_chan, src, is_token_in_rank, send_head)
        recv_topk_idx = recv_topk_weights = None
        L = num_tokens_per_expert.numel() // W
        if topk_idx is not None:
            lo = rank * L
            local = topk_idx[token] - lo[:, None]
            mine = (topk_idx[token] >= 0) & (local >= 0) & (local < L)
            local = torch.where(mine, local, torch.full_like(local, -1))
            wts = torch.where(mine, topk_weights[token], torch.zeros_like(topk_weights[token]))
            recv_topk_idx = _a2a(local, recv_splits, send_splits, g)
            recv_topk_weights = _a2a(wts, recv_splits, send_splits, g)
        per_expert = _a2a(num_tokens_per_expert.view(W, L).cpu(), [1] * W, [1] * W, g).sum(0)
        a = expert_alignment
        per_expert_list = [(-(-int(n) // a)) * a for n in per_expert.tolist()]
        if num_worst_tokens > 0:   # CUDA-graph friendly: a fixed receive size, no count on the host
            n = recv_x.shape[0]
            assert n <= num_worst_tokens, "num_worst_tokens smaller than what arrived"
            pad = num_worst_tokens - n
            recv_x = torch.cat([recv_x, recv_x.new_zeros(pad, H)])
            if recv_scales is not None:
                recv_scales = torch.cat([recv_scales, recv_scales.new_zeros(pad, recv_scales.shape[1])])
                out_x = (recv_x, recv_scales)
            else:
                out_x = recv_x
            if recv_topk_idx is not None:
                kk = recv_topk_idx.shape[1]
                recv_topk_idx = torch.cat([recv_topk_idx, recv_topk_idx.new_full((pad, kk), -1)])
                recv_topk_weights = torch.cat([recv_topk_weights, recv_topk_weights.new_zeros(pad, kk)])
            per_expert_list = []
        return out_x, recv_topk_idx, recv_topk_weights, per_expert_list, new_handle, EventOverlap()

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        self._check_alive()
        W, me, g = self.group_size, self.rank, self.group
        config = self.get_combine_config(W) if config is None else config
        rank_prefix, _, _, src_idx, is_token_in_rank, send_head = handle
        assert x.dim() == 2 and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32), \
            "DeepEP combines bf16"
        N, H = x.shape
        assert src_idx.shape[0] == N, "combine input must have one row per received token"
        self._check_nvl_bytes(config, H * 2)   # bf16 width (fp32 rows are the emulator's extra)
        self._ll_dirty = True
        self.stats["normal_combine"] += 1
        col = rank_prefix[:, me].tolist()
        send_splits = [col[0]] + [col[i] - col[i - 1] for i in range(1, W)]   # back to each source
        recv_splits = is_token_in_rank.sum(0).tolist()
        back = _a2a(x, recv_splits, send_splits, g)
        T = is_token_in_rank.shape[0]
        token, rank = is_token_in_rank.t().nonzero(as_tuple=True)[::-1]
        acc = torch.zeros(T, H, dtype=torch.float32)
        offsets = torch.tensor([0] + recv_splits).cumsum(0)
        acc.index_add_(0, token, back[offsets[rank] + send_head[token, rank].long()].float())
        for b in (bias if isinstance(bias, tuple) else (bias,)):
            if b is not None:
                acc += b.float()
        w_out = None
        if topk_weights is not None:
            wb = _a2a(topk_weights, recv_splits, send_splits, g)
            w_out = torch.zeros(T, topk_weights.shape[1], dtype=torch.float32)
            w_out.index_add_(0, token, wb[offsets[rank] + send_head[token, rank].long()])
        return acc.to(x.dtype), w_out, EventOverlap()

    def _check_nvl_bytes(self, config, hidden_bytes):
        need = config.get_nvl_buffer_size_hint(hidden_bytes, self.group_size) if self.group_size <= 8 else 0
        assert self.num_nvl_bytes >= need, f"num_nvl_bytes {self.num_nvl_bytes} < {need} needed"

    # ---- low-latency mode ------------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        assert self.low_latency_mode
        self._ll_dirty = False
        self.stats["clean"] += 1

    def _check_ll(self, max_tokens, hidden, num_experts):
        assert self.low_latency_mode, "low-latency kernels need a Buffer built with low_latency_mode=True"
        assert self.nvshmem_qp_depth >= (max_tokens + 1) * 2
        if self._ll_dirty:
            raise RuntimeError("deep_ep emulator: a low-latency kernel after normal kernels without "
                               "clean_low_latency_buffer() (DeepEP would read a dirty buffer)")
        need = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, self.group_size, num_experts)
        assert self.num_rdma_bytes >= need, f"num_rdma_bytes {self.num_rdma_bytes} < {need} needed"

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        self._check_alive()
        W, g, cap = self.group_size, self.group, num_max_dispatch_tokens_per_rank
        assert x.dim() == 2 and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32), \
            "DeepEP low-latency dispatch takes bf16"
        T, H = x.shape
        assert H % 128 == 0, "low-latency hidden must be a multiple of 128"
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == topk_idx_t
        assert topk_idx.shape[0] == T and T <= cap, f"{T} tokens > num_max_dispatch_tokens_per_rank {cap}"
        assert num_experts % W == 0 and not (async_finish and return_recv_hook)
        assert (W * cap) % 4 == 0, "TMA requires the number of tokens to be multiple of 4"
        assert not use_ue8m0 or round_scale
        if use_fp8:
            assert H % 512 == 0, "FP8 low-latency dispatch needs hidden % 512 == 0"
            assert not use_ue8m0, "the emulator does not pack UE8M0 scales"
        self._check_ll(cap, H, num_experts)
        self.stats["ll_dispatch"] += 1
        L = num_experts // W
        k = topk_idx.shape[1]
        flat = topk_idx.flatten()
        pair = (flat >= 0).nonzero().squeeze(1)
        e = flat[pair]
        # one message per (token, expert) pair, sent in (local expert, token) order to each rank
        order = torch.argsort(e * (T + 1) + pair // k, stable=True)
        pair, e = pair[order], e[order]
        tok = pair // k
        send_splits = torch.bincount(e // L, minlength=W).tolist()
        recv_splits = _a2a(torch.tensor(send_splits), [1] * W, [1] * W, g).tolist()
        meta = torch.stack([e % L, tok], 1)
        if use_fp8:
            q, s = per_token_cast_to_fp8(x, round_scale)
            payloads = [q[tok], s[tok]]
        else:
            payloads = [x[tok]]
        pending = [_a2a(t, recv_splits, send_splits, g, async_op=True) for t in [meta] + payloads]
        N, stats = W * cap, cumulative_local_expert_recv_stats
        packed_x = torch.empty(L, N, H, dtype=torch.float8_e4m3fn if use_fp8 else x.dtype)
        packed_scales = torch.empty(L, H // 128, N, dtype=torch.float32).transpose(1, 2) if use_fp8 else None
        packed_count = torch.zeros(L, dtype=torch.int32)
        src_info = torch.full((L, N), -1, dtype=torch.int32)
        layout_range = torch.zeros(L, W, dtype=torch.int64)

        def hook():
            m, *data = [p() for p in pending]
            src_rank = torch.repeat_interleave(torch.arange(W), torch.tensor(recv_splits))
            for le in range(L):
                sel = (m[:, 0] == le).nonzero().squeeze(1)   # (source rank, token) order
                n = sel.numel()
                packed_count[le] = n
                if n:
                    packed_x[le, :n] = data[0][sel]
                    if use_fp8:
                        packed_scales[le, :n] = data[1][sel]
                    src_info[le, :n] = m[sel, 1].to(torch.int32)
                per_src = torch.bincount(src_rank[sel], minlength=W)
                begin = torch.cumsum(per_src, 0) - per_src
                layout_range[le] = (begin << 32) | per_src
            if stats is not None:
                stats.add_(packed_count)
        if not return_recv_hook:
            hook()
        handle = (src_info, layout_range, cap, H, num_experts)
        out = (packed_x, packed_scales) if use_fp8 else packed_x
        return out, packed_count, handle, EventOverlap(), (hook if return_recv_hook else (lambda: None))

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None, combine_wait_recv_cost_stats=None):
        self._check_alive()
        W, g = self.group_size, self.group
        _, layout_range, cap, H, num_experts = handle
        L = num_experts // W
        assert x.dim() == 3 and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32), \
            "DeepEP low-latency combine takes bf16"
        assert tuple(x.shape) == (L, W * cap, H)
        assert topk_idx.shape == topk_weights.shape and topk_weights.dtype == torch.float32
        assert not (async_finish and return_recv_hook) and not use_logfmt and not zero_copy
        self._check_ll(cap, H, num_experts)
        self.stats["ll_combine"] += 1
        # back to each source rank, in the (local expert, token) order it sent them
        rows, dests = [], []
        for j in range(W):
            for le in range(L):
                begin, count = int(layout_range[le, j]) >> 32, int(layout_range[le, j]) & 0xFFFFFFFF
                rows.append(x[le, begin:begin + count])
                dests.append(count)
        per_dest = [sum(dests[j * L:(j + 1) * L]) for j in range(W)]
        T, k = topk_idx.shape
        flat = topk_idx.flatten()
        pair = (flat >= 0).nonzero().squeeze(1)
        e = flat[pair]
        order = torch.argsort(e * (T + 1) + pair // k, stable=True)
        pair = pair[order]
        recv_splits = torch.bincount(e // L, minlength=W).tolist()
        payload = torch.cat(rows) if rows else x.new_zeros(0, H)
        pending = _a2a(payload, recv_splits, per_dest, g, async_op=True)
        result = out if out is not None else torch.empty(T, H, dtype=x.dtype)

        def hook():
            back = pending()
            acc = torch.zeros(T, H, dtype=torch.float32)
            w = topk_weights.flatten()[pair].float()
            acc.index_add_(0, pair // k, back.float() * w[:, None])
            result.copy_(acc.to(result.dtype))
        if not return_recv_hook:
            hook()
        return result, EventOverlap(), (hook if return_recv_hook else (lambda: None))

    def get_next_low_latency_combine_buffer(self, handle):
        _, _, cap, H, num_experts = handle
        return torch.empty(num_experts // self.group_size, self.group_size * cap, H, dtype=torch.bfloat16)
