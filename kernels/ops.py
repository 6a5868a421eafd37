"""The one place the model calls kernels: each op picks its implementation by backend name.

`torch` is the reference and the CPU path; `triton` imports the Triton kernels lazily (so importing
the model never compiles or needs a GPU). Signatures are those of the torch references.
"""
import torch
import torch.nn.functional as F

from . import cpu_native, fp8, mla, moe, rmsnorm, router

BACKENDS = ("torch", "triton")


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")


def rms_norm(x, weight, eps, residual=None, backend="torch"):
    _check(backend)
    if backend == "triton":
        from .rmsnorm_triton import rmsnorm_triton
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm.rmsnorm_torch(x, weight, eps, residual)


def route_v3(logits, bias, backend="torch", **kw):
    _check(backend)
    if backend == "triton":
        from .router_triton import route_v3_triton
        return route_v3_triton(logits, bias, **kw)
    return router.route_v3_torch(logits, bias, **kw)


def route_v2(logits, backend="torch", **kw):
    # V2's softmax router is cheap and rare: the torch version serves every backend
    _check(backend)
    return router.route_v2_torch(logits, **kw)


def fused_moe(x, w13, w2, topk_ids, topk_weights, w13_scale=None, w2_scale=None, backend="torch"):
    """Routed experts; with scales, w13/w2 are fp8 with 128x128 block scales."""
    _check(backend)
    if backend == "triton":
        from .moe_triton import fused_moe_triton
        return fused_moe_triton(x, w13, w2, topk_ids, topk_weights, w13_scale, w2_scale)
    if w13_scale is not None:
        w13 = fp8.dequant_block_fp8(w13, w13_scale, dtype=x.dtype)
        w2 = fp8.dequant_block_fp8(w2, w2_scale, dtype=x.dtype)
    return moe.fused_moe_torch(x, w13, w2, topk_ids, topk_weights)


def linear(x, w):
    """y = x @ w.T for a plain weight: the C GEMM for a few fp32 rows on the CPU (a decode step),
    torch's otherwise (the same on every backend: on a GPU it is cuBLAS)."""
    if x.dim() == 2 and x.shape[0] <= cpu_native.MAX_ROWS and cpu_native.usable(x, w):
        return cpu_native.linear(x, w)
    return F.linear(x, w)


def head_linear(x, w, out=None):
    """Per head: out[t, h] = x[t, h] @ w[h].T, x [T, H, K] (a view with unit stride in its last dim
    is fine), w [H, N, K] -> [T, H, N], written into `out` when given (likewise a view). The C GEMM
    for a few fp32 rows on the CPU, a batched GEMM otherwise."""
    if out is None:
        out = x.new_empty(x.shape[0], x.shape[1], w.shape[1])
    if cpu_native.heads_usable(x, w, out):
        cpu_native.linear_heads(x, w, out)
    else:
        out.copy_(torch.einsum("thk,hnk->thn", x, w))
    return out


def fp8_linear(x, w, w_scale_inv, backend="torch"):
    """y = x @ dequant(w).T for an fp8 block-quantized weight."""
    _check(backend)
    if backend == "triton":
        from .fp8_triton import fp8_block_gemm_triton
        return fp8_block_gemm_triton(x, w, w_scale_inv)
    return x @ fp8.dequant_block_fp8(w, w_scale_inv, dtype=x.dtype).t()


def write_kv(kv_cache, latent, k_pe, slot_mapping, backend="torch"):
    _check(backend)
    if backend == "triton":
        from .kv_write_triton import write_kv_triton
        return write_kv_triton(kv_cache, latent, k_pe, slot_mapping)
    return mla.write_kv_torch(kv_cache, latent, k_pe, slot_mapping)


def gather_kv(kv_cache, block_table_row, length):
    """The first `length` cached latent rows of one sequence (a gather; the same on every backend)."""
    return mla.gather_kv_torch(kv_cache, block_table_row, length)


def mla_decode(q, kv_cache, block_table, seq_lens, query_start_loc, scale, kv_lora_rank,
               backend="torch", cache=None):
    """Absorbed MLA over the paged latent cache; seq_lens / query_start_loc are python int lists.
    `cache`: a per-step dict where the torch path keeps index tensors shared by all layers."""
    _check(backend)
    if backend == "triton":
        from .mla_decode_triton import mla_decode_triton
        return mla_decode_triton(q, kv_cache, block_table, seq_lens, query_start_loc, scale, kv_lora_rank,
                                 cache=cache)
    return mla.mla_decode_torch(q, kv_cache, block_table, seq_lens, query_start_loc, scale, kv_lora_rank,
                                cache)


def prefill_attention(q, k, v, cu_q, cu_k, scale, backend="torch"):
    _check(backend)
    if backend == "triton":
        from .prefill_triton import prefill_attention_triton
        return prefill_attention_triton(q, k, v, cu_q, cu_k, scale)
    return mla.prefill_attention_torch(q, k, v, cu_q, cu_k, scale)
