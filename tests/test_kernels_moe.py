"""Fused MoE (Triton) vs kernels/moe.py `fused_moe_torch` (and a w8a8 torch reference for FP8),
under the interpreter: -1 ids (experts on other ranks), empty experts, an expert with one token,
a single token, partial FP8 blocks (H = 192, INTER = 96: gate and up rows share a scale block)."""
import pytest
import torch
import torch.nn.functional as F

from devices import KERNEL_DTYPES, TOL, torch_threads
from kernels import cpu_native
from kernels.fp8 import dequant_block_fp8, per_token_group_quant_fp8_torch, quant_block_fp8
from kernels.moe import fused_moe_torch
from kernels.moe_triton import fused_moe_triton, moe_align

T, H, INTER, E, K = 11, 192, 96, 6, 2


def _routing(t=T, e=E, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(t)])  # experts 0..3 only
    if t > 5:
        ids[0, 1] = 4      # expert 4: exactly one token; expert 5 (and up): empty
        ids[2, 0] = -1     # choices owned by another rank
        ids[5, 1] = -1
    w = torch.rand(t, k, generator=g) + 0.1
    return ids, w


def _dense(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=g) / INTER ** 0.5).to(dtype)
    return x, w13, w2


def test_align_pads_each_expert_to_block():
    ids, _ = _routing()
    sorted_ids, expert_ids, total = moe_align(ids, E, 16)
    n = ids.numel()
    total = int(total)
    flat = ids.reshape(-1)
    seen = sorted(i for i in sorted_ids[:total].tolist() if i < n)
    assert seen == sorted(torch.nonzero(flat >= 0).flatten().tolist())  # every local pair once
    for blk in range(total // 16):
        rows = [r for r in sorted_ids[blk * 16:(blk + 1) * 16].tolist() if r < n]
        assert rows and all(flat[r] == expert_ids[blk] for r in rows)
    assert (expert_ids[total // 16:] == -1).all()
    assert total == 16 * 5  # experts 0..4 non-empty, one block each; expert 5 none


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cfg", [None, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=3, num_warps=4)])
def test_fused_moe_matches_reference(dtype, cfg):
    x, w13, w2 = _dense(dtype)
    ids, w = _routing()
    ref = fused_moe_torch(x, w13, w2, ids, w)
    out = fused_moe_triton(x, w13, w2, ids, w, config=cfg)
    assert out.dtype == dtype and out.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    assert out[2].abs().sum() > 0  # token 2 keeps its local choice


def test_fused_moe_all_remote_and_single_token():
    x, w13, w2 = _dense(torch.float32)
    ids, w = _routing()
    out = fused_moe_triton(x, w13, w2, torch.full_like(ids, -1), w)
    assert torch.equal(out, torch.zeros_like(x))
    ids1, w1 = ids[:1], w[:1]
    torch.testing.assert_close(fused_moe_triton(x[:1], w13, w2, ids1, w1),
                               fused_moe_torch(x[:1], w13, w2, ids1, w1), atol=1e-5, rtol=1e-5)
    assert fused_moe_triton(x[:0], w13, w2, ids[:0], w[:0]).shape == (0, H)


def _moe_w8a8_reference(x, w13q, s13, w2q, s2, ids, weights):
    """Token by token: x quantized per 1x128 group, fp32 gate/up, SiLU*up quantized per group,
    fp32 down, weighted sum. The quantization points of the Triton kernel."""
    def q(a):
        aq, s = per_token_group_quant_fp8_torch(a)
        return aq.float() * s.repeat_interleave(128, 1)[:, : a.shape[1]]
    w13d, w2d = dequant_block_fp8(w13q, s13), dequant_block_fp8(w2q, s2)
    xd = q(x.float())
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = xd[t] @ w13d[e].t()
            h = F.silu(gu[:INTER]) * gu[INTER:]
            out[t] += weights[t, j] * (q(h[None])[0] @ w2d[e].t())
    return out


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_fp8_w8a8(dtype):
    x, w13, w2 = _dense(torch.float32, seed=3)
    w13q, s13 = map(torch.stack, zip(*[quant_block_fp8(w) for w in w13]))
    w2q, s2 = map(torch.stack, zip(*[quant_block_fp8(w) for w in w2]))
    assert s13.shape == (E, 2, 2) and s2.shape == (E, 2, 1)  # partial blocks in both dims
    ids, w = _routing(seed=4)
    x = x.to(dtype)
    out = fused_moe_triton(x, w13q, w2q, ids, w, s13, s2)
    ref = _moe_w8a8_reference(x, w13q, s13, w2q, s2, ids, w)
    assert out.dtype == dtype
    # same quantization points: only fp32 summation order differs (and, rarely, an fp8 rounding
    # flip of the intermediate that it may cause), then the output rounding for fp16
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    # and w8a8 stays close to the dequantized-weight torch path the engine uses on CPU
    ref16 = fused_moe_torch(x.float(), dequant_block_fp8(w13q, s13), dequant_block_fp8(w2q, s2), ids, w)
    assert (out.float() - ref16).abs().max() < 0.05 * ref16.abs().max()


@pytest.mark.parametrize("grouped,threads", [(True, 1), (False, 1), (False, 2), (None, 1), (None, 2)])
def test_torch_moe_paths_match_per_token_math(grouped, threads, monkeypatch):
    """The CPU path's schedules (one batched GEMM over padded experts, one GEMM per expert, or -
    grouped None, a decode's few rows - the C expert loop, which must then be the one taken), on one
    or two threads, against the definition, token by token; -1 choices contribute nothing."""
    x, w13, w2 = _dense(torch.float32)
    ids, w = _routing()
    ran = []
    real = cpu_native.moe_experts
    monkeypatch.setattr(cpu_native, "moe_experts", lambda *a: ran.append(1) or real(*a))
    with torch_threads(threads), torch.inference_mode():   # inference mode: as the engine runs it
        out = fused_moe_torch(x, w13, w2, ids, w, grouped=grouped)
    assert ran == ([1] if grouped is None else [])
    ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            if e >= 0:
                h = w13[e] @ x[t]
                ref[t] += w[t, j] * (w2[e] @ (F.silu(h[:INTER]) * h[INTER:]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
