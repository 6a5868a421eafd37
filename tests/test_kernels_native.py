"""The CPU path's C kernels (kernels/cpu_native.c) against torch: the small-row GEMM over every
remainder of its 3-row x 4-column blocking, of its 8-wide inner loop and of its chunks of rows,
split over one and two threads (the routed-expert loop is tested with the MoE's other paths in
test_kernels_moe.py); the RMSNorm of a decode step's rows; the per-head GEMM; the MLA decode over
a paged cache; the thread pool in a forked child and under concurrent callers; and the fallback
when there is no compiler."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from devices import torch_threads
from kernels import cpu_native, ops


def test_library_builds_here():
    # CI machines have a C compiler: the C path must be what they test, not the fallback
    assert cpu_native.library() is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 5, 7, 33, 64, 151])     # 151 x 512: two chunks of x
@pytest.mark.parametrize("N,K", [(1, 8), (7, 13), (9, 512), (64, 100), (37, 3), (20, 1000)])
def test_linear_matches_fp64(M, N, K, threads):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    with torch_threads(threads):
        y = cpu_native.linear(x, w)
    ref = (x.double() @ w.double().t()).float()
    assert y.shape == (M, N)
    torch.testing.assert_close(y, ref, atol=1e-5 * K ** 0.5, rtol=1e-5)


def test_ops_linear_uses_c_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_native.linear
    monkeypatch.setattr(cpu_native, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    w = torch.randn(16, 32)
    for rows in (5, cpu_native.MAX_ROWS, cpu_native.MAX_ROWS + 1):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    ops.linear(torch.randn(5, 32).double(), w.double())          # not fp32: torch's
    ops.linear(torch.randn(32, 5).t(), w)                        # not contiguous: torch's
    assert calls == [5, cpu_native.MAX_ROWS]


@pytest.mark.parametrize("rows,n", [(1, 512), (3, 7), (5, 100), (64, 192), (2, 8)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_fp64(rows, n, residual):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x, w = torch.randn(rows, n, generator=g), 1 + 0.1 * torch.randn(n, generator=g)
    r = torch.randn(rows, n, generator=g) if residual else None
    out = cpu_native.rms_norm(x, w, 1e-6, r)
    y, total = out if residual else (out, x)
    if residual:
        assert torch.equal(total, x + r)   # the residual stream: the same rounding as torch's add
    xd = total.double()
    ref = (w.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).float()
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)


def test_rms_norm_uses_c_only_where_it_applies(monkeypatch):
    from kernels.rmsnorm import rmsnorm_torch
    calls = []
    real = cpu_native.rms_norm
    monkeypatch.setattr(cpu_native, "rms_norm", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    w = torch.randn(32)
    for rows in (5, cpu_native.MAX_ROWS, cpu_native.MAX_ROWS + 1):
        x, r = torch.randn(rows, 32), torch.randn(rows, 32)
        ref = F.rms_norm(x + r, (32,), w, 1e-6)
        y, total = rmsnorm_torch(x, w, 1e-6, r)
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(total, x + r)
    rmsnorm_torch(torch.randn(5, 32), w, 1e-6, torch.randn(32))    # a broadcast residual: torch's
    rmsnorm_torch(torch.randn(2, 5, 32), w, 1e-6)                  # not 2-D: torch's
    rmsnorm_torch(torch.randn(32, 5).t(), w, 1e-6)                 # not contiguous: torch's
    assert calls == [5, cpu_native.MAX_ROWS]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,H,K,N", [(1, 8, 64, 512), (5, 3, 13, 7), (64, 2, 512, 64), (0, 4, 8, 8)])
def test_head_linear_matches_fp64_on_views(T, H, K, N, threads):
    """x and out as views of wider rows (the query's nope part, the latent part of the attention's
    input), as MLA's absorbed path passes them."""
    g = torch.Generator().manual_seed(T * 1000 + H * 100 + K)
    x = torch.randn(T, H, K + 5, generator=g)[..., 2:K + 2]
    w = torch.randn(H, N, K, generator=g)
    buf = torch.full((T, H, N + 3), float("nan"))
    with torch_threads(threads):
        assert cpu_native.heads_usable(x, w, buf[..., :N])
        ops.head_linear(x, w, out=buf[..., :N])
    ref = torch.einsum("thk,hnk->thn", x.double(), w.double()).float()
    torch.testing.assert_close(buf[..., :N], ref, atol=1e-5 * K ** 0.5, rtol=1e-5)
    assert buf[..., N:].isnan().all()                              # nothing written past the view
    torch.testing.assert_close(ops.head_linear(x.double(), w.double()).float(), ref)   # torch's path


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("STAGGER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="CPU C kernels unavailable"):
        assert cpu_native.library() is None
    assert not cpu_native.usable(torch.ones(2, 2))
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))   # torch's GEMM serves
    assert list(tmp_path.iterdir()) == []                          # no half-built file left


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("STAGGER_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_native.library() is None


@pytest.mark.parametrize("H", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("D,latent", [(576, 512), (41, 37), (24, 8), (7, 5)])
@pytest.mark.parametrize("S", [1, 9, 100])
def test_mla_decode_matches_softmax_attention(H, D, latent, S):
    """One query token's heads over S shared latent rows in a paged cache, every remainder of the
    value pass's 3-row x 32-column blocks and of its 8-wide vectors, against fp64 softmax attention."""
    g = torch.Generator().manual_seed(H * 100 + D + S)
    q, kv = torch.randn(H, D, generator=g), torch.randn(S, D, generator=g)
    scale = D ** -0.5
    # pages of 4 rows: two runs of consecutive pages (each read as one) with a gap between them
    pages = -(-S // 4)
    cache = torch.full((pages + 5, 4, D), 1e4)                  # poison: any page not listed
    i = torch.arange(pages, dtype=torch.int32)
    blocks = (i + 2 + 3 * (i >= pages // 2)).int()
    cache.view(-1, D)[(blocks[:, None] * 4 + torch.arange(4)).flatten()[:S]] = kv
    out = torch.full((1, H, latent), float("nan"))
    one = torch.zeros(1, dtype=torch.int32)
    cpu_native.mla_decode(q[None], cache, blocks[None], one, one, one + S, latent, scale, out)
    out = out[0]
    p = (q.double() @ kv.double().t() * scale).softmax(-1)
    torch.testing.assert_close(out, (p @ kv.double()[:, :latent]).float(), atol=1e-5, rtol=1e-5)


def _linear_in_child(x, w, ref):
    torch.set_num_threads(2)
    assert torch.allclose(cpu_native.linear(x, w), ref, atol=1e-4)


def test_threads_in_a_forked_child_and_concurrent_callers():
    """The C pool's workers do not survive a fork: the child makes its own (it hung otherwise);
    two Python threads calling at once both get right answers (the second runs alone)."""
    import multiprocessing
    import threading
    x, w = torch.randn(24, 64), torch.randn(40, 64)
    ref = x @ w.t()
    with torch_threads(2):
        torch.testing.assert_close(cpu_native.linear(x, w), ref, atol=1e-4, rtol=1e-4)   # workers up
        child = multiprocessing.get_context("fork").Process(target=_linear_in_child, args=(x, w, ref))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
        bad = []

        def caller():
            for _ in range(200):
                if not torch.allclose(cpu_native.linear(x, w), ref, atol=1e-4):
                    bad.append(1)
        callers = [threading.Thread(target=caller) for _ in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(60)
        assert not bad and not any(t.is_alive() for t in callers)
