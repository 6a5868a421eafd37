"""Varlen causal prefill attention (Triton) vs kernels/mla.py `prefill_attention_torch`."""
import math

import pytest
import torch

from devices import KERNEL_DTYPES, TOL
from kernels.mla import prefill_attention_torch
from kernels.prefill_triton import prefill_attention_triton


def _case(q_lens, k_lens, heads, d_qk, d_v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = [0], [0]
    for a, b in zip(q_lens, k_lens):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    q = torch.randn(cu_q[-1], heads, d_qk, generator=g).to(dtype)
    k = torch.randn(cu_k[-1], heads, d_qk, generator=g).to(dtype)
    v = torch.randn(cu_k[-1], heads, d_v, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k, 1.5 / math.sqrt(d_qk)




@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_prefill_v3_head_dims(dtype):
    # qk 192 = 128 + 64 (split dot), v 128; lengths off the 32-row tiles; a single-token prompt
    q, k, v, cu_q, cu_k, scale = _case([37, 1, 64], [37, 1, 64], 2, 192, 128, dtype)
    ref = prefill_attention_torch(q, k, v, cu_q, cu_k, scale)
    out = prefill_attention_triton(q, k, v, cu_q, cu_k, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_prefill_chunked_after_cached_prefix():
    # queries are the last keys: chunks of 20 and 1 after prefixes of 50 and 33; an empty chunk
    q, k, v, cu_q, cu_k, scale = _case([20, 0, 1], [70, 5, 34], 3, 48, 32, torch.float32, seed=1)
    ref = prefill_attention_torch(q, k, v, cu_q, cu_k, scale)
    out = prefill_attention_triton(q, k, v, cu_q, cu_k, scale)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("d_qk,d_v", [(24, 20), (12, 8), (100, 16)])
def test_prefill_small_odd_head_dims(d_qk, d_v):
    # padded to powers of two (>= 16) with masks: 24 = 16 + 8(->16), 12 (->16), 100 = 64 + 36(->64)
    q, k, v, cu_q, cu_k, scale = _case([9, 33], [9, 40], 2, d_qk, d_v, torch.float32, seed=d_qk)
    ref = prefill_attention_torch(q, k, v, cu_q, cu_k, scale)
    out = prefill_attention_triton(q, k, v, cu_q, cu_k, scale)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_prefill_strided_heads():
    # k/v as views into a wider projection output (head stride != head dim)
    q, k, v, cu_q, cu_k, scale = _case([5], [5], 2, 32, 16, torch.float32, seed=9)
    kv = torch.randn(5, 2, 48)
    k2, v2 = kv[..., :32], kv[..., 32:]
    ref = prefill_attention_torch(q, k2, v2, cu_q, cu_k, scale)
    torch.testing.assert_close(prefill_attention_triton(q, k2, v2, cu_q, cu_k, scale), ref,
                               **TOL[torch.float32])
