"""The DeepSeek-V3 / V2 network, top to bottom.

Tokens of all sequences in a step are flattened into one [T, hidden] batch; attention reads and
writes a paged latent KV cache described by `AttentionMetadata`. Parameter names follow the Hugging
Face checkpoints, so loading is a name-for-name copy (experts are stacked, see `Experts`).
"""
import math
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from .config import ModelConfig, yarn_mscale


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit. Sequence b owns tokens query_start_loc[b]:query_start_loc[b+1]."""
    positions: torch.Tensor          # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor       # [T] int64, flat cache slot each new token is written to
    block_tables: torch.Tensor       # [B, max_blocks] int32
    seq_lens: list[int]              # context length of each sequence including this step's tokens
    query_start_loc: list[int]       # [B + 1] prefix sums of tokens per sequence
    mla_path: str = "auto"           # "auto" | "absorbed" | "expanded"
    cache: dict = field(default_factory=dict)   # per-step values shared by all layers (rope tables)

    @property
    def decode_only(self) -> bool:
        q = self.query_start_loc
        return all(q[i + 1] - q[i] <= 1 for i in range(len(q) - 1))

    def use_absorbed(self) -> bool:
        # absorbed (latent MQA) is bandwidth-optimal for single-token queries; expanded per-head K/V
        # is compute-efficient for prompts. Both give the same result (see tests).
        return self.mla_path == "absorbed" or (self.mla_path == "auto" and self.decode_only)

    def split_decodes(self) -> tuple["AttentionMetadata | None", "AttentionMetadata"]:
        """A mixed step on the auto path -> (its leading single-token sequences, the rest), each as
        its own metadata, built once per step. A batch lists its decodes first (scheduler.batch), so
        they take the absorbed path while the prompts beside them take the expanded one (expanding
        every decode's whole context through kv_b_proj made a mixed step cost 5-8x a decode step)."""
        parts = self.cache.get("split_decodes")
        if parts is None:
            q, d = self.query_start_loc, 0
            while self.mla_path == "auto" and d < len(q) - 1 and q[d + 1] - q[d] == 1:
                d += 1
            parts = ()   # not (None, self): a step's metadata would hold itself through its cache
            if d:
                dec = AttentionMetadata(self.positions[:d], self.slot_mapping[:d], self.block_tables[:d],
                                        self.seq_lens[:d], q[:d + 1], "absorbed")
                for key, n in (("seq_lens_i32", d), ("query_start_loc_i32", d + 1)):
                    if key in self.cache:
                        dec.cache[key] = self.cache[key][:n]
                rest = AttentionMetadata(self.positions[d:], self.slot_mapping[d:], self.block_tables[d:],
                                         self.seq_lens[d:], [x - d for x in q[d:]], "expanded")
                parts = (dec, rest)
            self.cache["split_decodes"] = parts
        return parts or (None, self)


class KeepFp32:
    """Mixin: the tensors named in `fp32_names` stay float32 when the model is cast (`.to(bf16)`),
    as transformers keeps them; device moves still apply. Rope angles from a bf16 inv_freq drift by
    ~0.5 rad near position 500, and a bf16 router bias flips expert choices."""
    fp32_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        # detached snapshots: a cast may swap a Parameter's .data in place
        kept = {n: getattr(self, n).detach() for n in self.fp32_names if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = getattr(self, n)
            if old.dtype == torch.float32 and new.dtype != torch.float32:
                t = old.detach().to(new.device)
                setattr(self, n, nn.Parameter(t, requires_grad=False) if isinstance(new, nn.Parameter) else t)
        return self


def _param(*shape) -> nn.Parameter:
    # uninitialized: every parameter is overwritten by the loader, so skip the init cost
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). The loader may swap `weight` for fp8 and set `weight_scale_inv` (128x128
    block scales); then the kernel backend does a block-scaled GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None
        self.weight_scale_inv = None
        self.backend = "torch"

    def forward(self, x):
        if self.weight_scale_inv is None:
            y = ops.linear(x, self.weight)
        else:
            y = ops.fp8_linear(x, self.weight, self.weight_scale_inv, backend=self.backend)
        return y if self.bias is None else y + self.bias

    def dense_weight(self, dtype) -> torch.Tensor:
        """The weight as a plain matrix (dequantized if fp8)."""
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        from kernels.fp8 import dequant_block_fp8
        return dequant_block_fp8(self.weight, self.weight_scale_inv, dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = _param(dim)
        self.eps = eps
        self.backend = "torch"

    def forward(self, x, residual=None):
        return ops.rms_norm(x, self.weight, self.eps, residual, backend=self.backend)


class Rotary(KeepFp32, nn.Module):
    """RoPE on the rope part of queries and keys, with DeepSeek's yarn scaling.

    Interleaved layout (DeepSeek's checkpoints): dims (2i, 2i+1) form a pair. The rotated output is
    written de-interleaved (evens then odds); queries and keys get the same permutation, so their dot
    products are unchanged, and cached keys stay consistent with later queries.
    """

    fp32_names = ("inv_freq",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, r = cfg.qk_rope_head_dim, cfg.rope
        pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv_freq = 1.0 / pos_freqs
        self.attention_factor = 1.0
        if r.kind == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(pos_freqs, dim, r)
        self.interleave = cfg.rope_interleave
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, positions: torch.Tensor, dtype, cache: dict | None = None):
        """cos, sin [T, D/2] for these positions (memoized per step: every layer shares them)."""
        key = ("rope", dtype)
        if cache is not None and key in cache:
            return cache[key]
        inv = self.inv_freq
        if inv.device != positions.device:
            inv = inv.to(positions.device)
        freqs = positions[:, None].float() * inv
        out = ((freqs.cos() * self.attention_factor).to(dtype),
               (freqs.sin() * self.attention_factor).to(dtype))
        if cache is not None:
            cache[key] = out
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x [T, H, D] (or [T, D]) -> rotated, same shape."""
        cos, sin = self.tables(positions, x.dtype, cache)
        if x.dim() == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _yarn_inv_freq(pos_freqs, dim, r):
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp in between."""
    orig = r.original_max_position_embeddings

    def correction_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (r.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if r.attention_factor is not None:
        factor = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    else:
        factor = yarn_mscale(r.factor)
    return inv_freq, factor


class MLA(nn.Module):
    """Multi-head Latent Attention. The cache holds, per token, the normalized KV latent
    (kv_lora_rank) and the roped shared key (qk_rope_head_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads = H
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, H * cfg.qk_head_dim)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # DeepSeek uses the default eps here
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = Linear(H * cfg.v_head_dim, h, bias=cfg.attention_bias)
        self.rotary = Rotary(cfg)
        self.scale = cfg.softmax_scale
        self.backend = "torch"
        self._absorbed = None  # (W_UK^T [H, Dl, nope], W_UV [H, v, Dl]), built on first decode

    def forward(self, x, meta: AttentionMetadata, kv_cache: torch.Tensor):
        c, H = self.cfg, self.num_heads
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(-1, H, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_pe = self.rotary(q_pe, meta.positions, meta.cache)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        k_pe = self.rotary(k_pe, meta.positions, meta.cache)
        ops.write_kv(kv_cache, latent, k_pe, meta.slot_mapping, backend=self.backend)
        if x.shape[0] == 0:   # an idle rank's zero-token step (it still joins the MoE exchange)
            out = x.new_zeros(0, H, c.v_head_dim)
        elif meta.use_absorbed():
            out = self._absorbed_attention(q_nope, q_pe, meta, kv_cache)
        else:
            dec, rest = meta.split_decodes()
            d = 0 if dec is None else dec.query_start_loc[-1]
            out = self._expanded_attention(q_nope[d:], q_pe[d:], rest, kv_cache)
            if dec is not None:
                out = torch.cat([self._absorbed_attention(q_nope[:d], q_pe[:d], dec, kv_cache), out])
        return self.o_proj(out.reshape(out.shape[0], H * c.v_head_dim))

    def _expanded_attention(self, q_nope, q_pe, meta, kv_cache):
        """Per-head K/V from kv_b_proj over each sequence's whole context (prefix + new tokens)."""
        c, H = self.cfg, self.num_heads
        rows = [ops.gather_kv(kv_cache, meta.block_tables[b], s) for b, s in enumerate(meta.seq_lens)]
        ctx = torch.cat(rows).to(q_nope.dtype)
        kv = self.kv_b_proj(ctx[:, : c.kv_lora_rank]).view(-1, H, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_pe = ctx[:, None, c.kv_lora_rank:].expand(-1, H, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        cu_k = [0, *accumulate(meta.seq_lens)]
        return ops.prefill_attention(q, k, v.contiguous(), meta.query_start_loc, cu_k, self.scale,
                                     backend=self.backend)

    def absorbed_weights(self, dtype):
        """(W_UK^T [H, Dl, nope], W_UV [H, v, Dl]): kv_b_proj's two halves, each head's matrix in
        the [out, in] layout of ops.head_linear."""
        if self._absorbed is None or self._absorbed[0].dtype != dtype:
            c, H = self.cfg, self.num_heads
            w = self.kv_b_proj.dense_weight(dtype).view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
            self._absorbed = (w[:, : c.qk_nope_head_dim].transpose(1, 2).contiguous(),
                              w[:, c.qk_nope_head_dim:].contiguous())
        return self._absorbed

    def _absorbed_attention(self, q_nope, q_pe, meta, kv_cache):
        """Fold W_UK into the query and W_UV into the output: attention runs in latent space."""
        w_ukt, w_uv = self.absorbed_weights(q_nope.dtype)
        Dl = self.cfg.kv_lora_rank
        q = q_nope.new_empty(q_nope.shape[0], self.num_heads, Dl + q_pe.shape[-1])   # [T, H, Dl + Dr]
        ops.head_linear(q_nope, w_ukt, out=q[..., :Dl])           # q_lat = q_nope W_UK, per head
        q[..., Dl:] = q_pe
        o_lat = ops.mla_decode(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               self.scale, Dl, backend=self.backend, cache=meta.cache)   # [T, H, Dl]
        return ops.head_linear(o_lat, w_uv)                       # [T, H, v]


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter)
        self.up_proj = Linear(hidden, inter)
        self.down_proj = Linear(inter, hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(KeepFp32, nn.Module):
    fp32_names = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size)
        if cfg.model_type == "deepseek_v3":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False)
        self.backend = "torch"

    def forward(self, x):
        """-> (weights fp32 [T, k], global expert ids int64 [T, k])."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        common = dict(top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                      norm_topk_prob=c.norm_topk_prob, scaling=c.routed_scaling_factor)
        if c.model_type == "deepseek_v3":
            return ops.route_v3(logits, self.e_score_correction_bias.float(), backend=self.backend, **common)
        return ops.route_v2(logits, method=c.topk_method, backend=self.backend, **common)


class Experts(nn.Module):
    """The routed-expert slots this rank holds, stacked: w13 [S, 2I, H] (gate rows, then up rows),
    w2 [S, H, I]. `slot_experts[s]` is the logical expert in slot s (EPLB may give a hot expert
    several slots across ranks); `expert_map[g]` is a local slot of logical expert g, or -1."""

    def __init__(self, cfg: ModelConfig, local_experts: list[int]):
        super().__init__()
        n, h, i = len(local_experts), cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = cfg.n_routed_experts
        self.w13 = _param(n, 2 * i, h)
        self.w2 = _param(n, h, i)
        self.w13_scale = self.w2_scale = None
        self.register_buffer("expert_map", torch.full((cfg.n_routed_experts,), -1, dtype=torch.int64),
                             persistent=False)
        self.set_slots(local_experts)
        self.backend = "torch"

    def set_slots(self, slot_experts: list[int]) -> None:
        self.slot_experts = list(slot_experts)
        emap = torch.full((self.num_experts,), -1, dtype=torch.int64)
        for slot in reversed(range(len(slot_experts))):
            emap[slot_experts[slot]] = slot
        self.expert_map = emap.to(self.expert_map.device)

    @property
    def local_experts(self) -> list[int]:
        return sorted(set(self.slot_experts))

    def forward(self, x, topk_ids, topk_weights):
        """topk_ids are LOGICAL ids; choices of experts held elsewhere contribute nothing."""
        return self.compute(x, self.expert_map[topk_ids], topk_weights)

    def compute(self, x, slot_ids, topk_weights):
        """slot_ids index this rank's slots (-1: skip)."""
        return ops.fused_moe(x, self.w13, self.w2, slot_ids, topk_weights, self.w13_scale, self.w2_scale,
                             backend=self.backend)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, local_experts: list[int]):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg, local_experts)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # Expert parallelism: the engine installs an exchange with run(x, topk_ids, topk_weights,
        # experts, overlap) -> (routed output for x, overlap()) (dispatch, compute, combine).
        self.ep = None
        self.expert_load: torch.Tensor | None = None   # set by the engine when EPLB is on
        # static decode: bool [T] on the device, False for padding rows (no expert, not counted); a
        # device tensor, not a row count, so a captured CUDA graph reads each step's value
        self.real_rows: torch.Tensor | None = None

    def forward(self, x):
        weights, ids = self.gate(x)
        real = self.real_rows
        if self.expert_load is not None:   # EPLB statistics: tokens routed to each logical expert
            # scatter_add: bincount on CUDA reads its max back (a host sync)
            ones = torch.ones_like(ids) if real is None else real[:, None].expand_as(ids).to(ids.dtype)
            self.expert_load.scatter_add_(0, ids.reshape(-1), ones.reshape(-1))
        shared = (lambda: self.shared_experts(x)) if self.shared_experts is not None else (lambda: None)
        if self.ep is None and real is not None:   # padding rows choose no expert (slot -1)
            slots = self.experts.expert_map[ids].masked_fill(~real[:, None], -1)
            routed, side = self.experts.compute(x, slots, weights), shared()
        elif self.ep is None:
            routed, side = self.experts(x, ids, weights), shared()
        else:   # the shared experts run while the tokens are on the wire
            routed, side = self.ep.run(x, ids, weights, self.experts, overlap=shared)
        return routed if side is None else routed + side


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, local_experts: list[int]):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = (MoE(cfg, local_experts) if cfg.is_moe_layer(idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, meta, kv_cache):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, local_experts: list[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, local_experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """The whole network. `local_experts`: the routed experts this rank holds (default: all)."""

    def __init__(self, cfg: ModelConfig, local_experts: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        if local_experts is None:
            local_experts = list(range(cfg.n_routed_experts))
        self.model = DeepseekModel(cfg, local_experts)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def set_backend(self, attention: str = "torch", moe: str = "torch", linear: str | None = None) -> None:
        """Pick kernel implementations: `attention` for MLA/norms/rope, `moe` for routers/experts,
        `linear` for dense (FP8) GEMMs (default: as `moe`)."""
        for m in self.modules():
            if isinstance(m, (MLA, RMSNorm)):
                m.backend = attention
            elif isinstance(m, (Gate, Experts)):
                m.backend = moe
            elif isinstance(m, Linear):
                m.backend = linear or moe

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]):
        """input_ids [T] -> final hidden states [T, hidden] (normed)."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, meta, cache)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else None
        return ops.linear(hidden, w) if w is not None else self.lm_head(hidden)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
