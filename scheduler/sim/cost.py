"""Step-time cost models for the simulator: what one lockstep step of an instance costs.

A step runs on every rank of an instance together (the MoE all-to-all synchronizes them), so
`step(works)` returns the instance's step time and each rank's busy time; a rank's bubble is the
part of the step it spends waiting for the slowest rank.

- `LinearCost`: per rank t = c0 + c_tok*tokens + c_ctx*context + c_seq*seqs, step = slowest rank.
  Coefficients come from a JSON file (e.g. fitted from the real engine's measured step times).
- `RooflineCost`: DeepSeek-V3 on H800/H100/H200 from first principles, see its docstring.
"""
import json
import math
from dataclasses import dataclass


@dataclass
class RankWork:
    """What one rank computes in one step (built by the simulator from a ScheduledBatch)."""
    tokens: int = 0             # new tokens (decode + prefill chunks)
    seqs: int = 0               # sequences in the batch
    sampled: int = 0            # sequences whose logits are sampled this step (LM head rows)
    prefill_tokens: int = 0
    prefill_pairs: float = 0.0  # causal query-key pairs of the prefill chunks
    decode_ctx: int = 0         # context tokens the decodes attend over

    @property
    def context(self) -> float:
        """Attention context in query-key pairs (a decode over c tokens counts c)."""
        return self.prefill_pairs + self.decode_ctx


class LinearCost:
    """t_rank = c0 + c_tok*tokens + c_ctx*context + c_seq*seqs (context: query-key pairs).
    c0 is the fixed per-step cost every rank pays; an instance's step lasts as long as its slowest
    rank; a rank with no tokens only pays c0 (its zero-token forward)."""
    name = "linear"

    def __init__(self, c0: float, c_tok: float, c_ctx: float = 0.0, c_seq: float = 0.0):
        self.c0, self.c_tok, self.c_ctx, self.c_seq = c0, c_tok, c_ctx, c_seq

    @classmethod
    def from_json(cls, path: str) -> "LinearCost":
        """{"c0":..,"c_tok":..,"c_ctx":..,"c_seq":..}, possibly nested under "coefficients"."""
        with open(path) as f:
            d = json.load(f)
        d = d.get("coefficients", d)
        try:
            return cls(float(d["c0"]), float(d["c_tok"]), float(d.get("c_ctx", 0.0)),
                       float(d.get("c_seq", 0.0)))
        except KeyError:
            raise ValueError(f"{path}: cost model JSON needs c0 and c_tok (got keys {sorted(d)})") from None

    def local(self, w: RankWork) -> float:
        return self.c_tok * w.tokens + self.c_ctx * w.context + self.c_seq * w.seqs if w.tokens else 0.0

    def step(self, works: list[RankWork]) -> tuple[float, list[float]]:
        local = [self.local(w) for w in works]
        return self.c0 + max(local), [self.c0 + t for t in local]


@dataclass(frozen=True)
class GPU:
    name: str
    gemm_flops: float     # achieved FP8 GEMM FLOP/s (dense peak x efficiency)
    attn_flops: float     # achieved bf16 attention FLOP/s (prefill, MHA form)
    mla_flops: float      # achieved absorbed-MLA decode FLOP/s
    hbm_bw: float         # achieved HBM bytes/s
    memory: float         # bytes
    nvlink_bw: float      # achieved DeepEP intranode all-to-all bytes/s per rank
    rdma_bw: float        # achieved DeepEP internode bytes/s per rank


# Peak figures from FACTS.md: H100/H800 SXM 1979 fp8 / 989 bf16 TFLOP/s, 3.35 TB/s; H200 4.8 TB/s.
# Efficiencies (assumptions): GEMMs 60 % of fp8 peak (DeepGEMM reaches ~1300 TFLOP/s at best),
# prefill attention 60 % of bf16 peak, MLA decode as FlashMLA (660 TFLOP/s, 90 % of HBM peak),
# HBM 90 % of peak (measured device copy: 3.0 TB/s H100, 4.3 TB/s H200). DeepEP: 153 GB/s intranode
# and ~50 GB/s RDMA measured on H800; for H100/H200 (NVLink 900 vs 400 GB/s) intranode is scaled by
# 900/400 (an assumption, not a measurement).
GPUS = {
    "h800": GPU("H800", 0.6 * 1979e12, 0.6 * 989e12, 660e12, 3.0e12, 80e9, 153e9, 50e9),
    "h100": GPU("H100", 0.6 * 1979e12, 0.6 * 989e12, 660e12, 3.0e12, 80e9, 153e9 * 9 / 4, 50e9),
    "h200": GPU("H200", 0.6 * 1979e12, 0.6 * 989e12, 660e12, 4.3e12, 141e9, 153e9 * 9 / 4, 50e9),
}


class RooflineCost:
    """DeepSeek-V3 (671B, 61 layers of which 58 MoE, MLA, 256 routed experts top-8, FP8 weights)
    on one instance of `num_ranks` GPUs with DP attention and EP experts.

    Assumptions:
    - Weights FP8 (1 byte/param) except embeddings and LM head (bf16); routed experts spread evenly
      over the EP ranks (plus `redundant` replicas), balanced by EPLB (`expert_imbalance` scales
      the busiest rank's routed tokens); non-routed weights replicated on every rank.
    - Per-rank ("local") time, which differs between ranks: GEMMs of attention projections, dense
      MLPs (3 layers), shared expert, router and LM head (sampled rows only), each
      max(FLOPs / achieved FP8 FLOP/s, weight bytes / HBM bandwidth) since the weights are streamed
      once per step; prefill attention in MHA form (qk 192 + v 128 per head, 128 heads) at
      achieved bf16 FLOP/s over causal pairs; decode attention absorbed (MQA over the 576-wide
      latent, value 512) as max(FLOPs/660 TFLOP/s, latent bytes (bf16) / bandwidth).
    - Shared time, same for all ranks: routed experts get total_tokens*8/N tokens per rank; only
      experts that receive a token are read (expected fraction 1-(1-8/256)^total_tokens).
    - All-to-all per MoE layer: fixed latency (DeepEP low-latency figures, 77->194 us dispatch and
      114->369 us combine for 8->256 ranks, log-interpolated) plus bytes of the busiest sender
      (fp8 dispatch + bf16 combine of hidden 7168) over NVLink (<= 8 ranks, expected distinct remote
      ranks) or RDMA (> 8 ranks: one copy per distinct remote node, at most 4 nodes per token).
    - Two micro-batches overlap compute and communication: step = overhead + max(compute, comm),
      compute = slowest rank's local time + routed-expert time. Zero-token ranks still run experts.
    Busy time per rank = its local time + routed-expert time (utilization is busy / wall time).
    """
    H, LAYERS, MOE_LAYERS, DENSE_LAYERS = 7168, 61, 58, 3
    ATTN_PROJ = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    DENSE_MLP = 3 * 7168 * 18432
    EXPERT = 3 * 7168 * 2048
    ROUTER = 7168 * 256
    VOCAB = 129280
    KV_BYTES_PER_TOKEN = 576 * 2 * 61      # bf16 latent cache, all layers
    NUM_EXPERTS, TOPK = 256, 8

    def __init__(self, gpu: str, num_ranks: int, *, overhead_s: float = 1e-3, expert_imbalance: float = 1.05,
                 redundant: int = 0, reserve_bytes: float = 8e9):
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; choose one of {sorted(GPUS)}")
        self.gpu, self.n = GPUS[gpu], num_ranks
        self.name = f"{gpu}-v3"
        self.overhead_s, self.expert_imbalance = overhead_s, expert_imbalance
        self.experts_per_rank = (self.NUM_EXPERTS + redundant) / num_ranks
        dense = self.ATTN_PROJ * self.LAYERS + self.DENSE_MLP * self.DENSE_LAYERS + \
            (self.EXPERT + self.ROUTER) * self.MOE_LAYERS
        self.dense_params = dense
        self.streamed_bytes = dense + 2 * self.H * self.VOCAB       # fp8 dense + bf16 LM head
        self.weight_bytes = self.streamed_bytes + 2 * self.H * self.VOCAB + \
            self.experts_per_rank * self.EXPERT * self.MOE_LAYERS
        self.kv_bytes = self.gpu.memory - self.weight_bytes - reserve_bytes
        nodes = max(1, num_ranks // 8)
        if num_ranks <= 8:
            self.bw = self.gpu.nvlink_bw
            self.fanout = (num_ranks - 1) * (1 - (1 - 1 / num_ranks) ** self.TOPK) if num_ranks > 1 else 0.0
        else:
            self.bw = self.gpu.rdma_bw
            self.fanout = min(4.0, (nodes - 1) * (1 - (1 - 1 / nodes) ** self.TOPK))
        x = (math.log2(max(num_ranks, 8)) - 3) / 5
        self.latency = (0.0 if num_ranks == 1
                        else (77e-6 + x * (194e-6 - 77e-6)) + (114e-6 + x * (369e-6 - 114e-6)))

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks of `block_size` tokens that fit in what the weights leave of GPU memory."""
        blocks = int(self.kv_bytes // (block_size * self.KV_BYTES_PER_TOKEN))
        if blocks <= 0:
            raise ValueError(f"DeepSeek-V3 does not fit on {self.n} x {self.gpu.name}: "
                             f"{self.weight_bytes / 1e9:.0f} GB of weights per GPU; use more ranks or h200")
        return blocks

    def local(self, w: RankWork) -> float:
        if not w.tokens:
            return 0.0
        g = self.gpu
        flops = 2 * (self.dense_params * w.tokens + self.H * self.VOCAB * w.sampled)
        proj = max(flops / g.gemm_flops, self.streamed_bytes / g.hbm_bw)
        prefill = self.LAYERS * 2 * 128 * (192 + 128) * w.prefill_pairs / g.attn_flops
        decode = self.LAYERS * max(2 * 128 * (576 + 512) * w.decode_ctx / g.mla_flops,
                                   w.decode_ctx * 576 * 2 / (0.9 * g.hbm_bw))
        return proj + prefill + decode

    def step(self, works: list[RankWork]) -> tuple[float, list[float]]:
        g = self.gpu
        local = [self.local(w) for w in works]
        total = sum(w.tokens for w in works)
        routed = total * self.TOPK / self.n * self.expert_imbalance
        hit = 1 - (1 - self.TOPK / self.NUM_EXPERTS) ** total
        experts = self.MOE_LAYERS * max(2 * self.EXPERT * routed / g.gemm_flops,
                                        self.experts_per_rank * hit * self.EXPERT / g.hbm_bw)
        top = max(w.tokens for w in works)
        comm = (self.MOE_LAYERS * (self.latency + top * self.fanout * self.H * 3 / self.bw)
                if self.n > 1 else 0.0)
        t = self.overhead_s + max(max(local) + experts, comm)
        return t, [loc + experts for loc in local]


def make_cost_model(spec: str, num_ranks: int):
    """'h800-v3' | 'h100-v3' | 'h200-v3' | 'fitted:FILE.json' | 'linear:c0,c_tok[,c_ctx[,c_seq]]'."""
    if spec.startswith("fitted:"):
        return LinearCost.from_json(spec[len("fitted:"):])
    if spec.startswith("linear:"):
        vals = [float(v) for v in spec[len("linear:"):].split(",")]
        if not 2 <= len(vals) <= 4:
            raise ValueError(f"linear cost model needs 2-4 coefficients, got {spec!r}")
        return LinearCost(*vals)
    if spec.endswith("-v3") and spec[:-3] in GPUS:
        return RooflineCost(spec[:-3], num_ranks)
    raise ValueError(f"unknown cost model {spec!r}: "
                     "use h800-v3, h100-v3, h200-v3, fitted:FILE or linear:c0,c_tok,...")
