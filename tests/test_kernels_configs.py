"""Launch configs as data, and the GPU microbenchmarks' CPU behaviour (parse args, list shapes,
exit with a clear message without CUDA)."""
import importlib
import json

import pytest
import torch

from kernels import configs


def test_interpreter_gets_one_config_per_kernel():
    assert configs.is_interpreting()  # tests/conftest.py
    for kernel in configs.DEFAULTS:
        assert configs.get_config(kernel, "anything") == configs.INTERPRET[kernel]


def test_defaults_tuned_and_user_json_layering(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = configs.get_config("fp8_gemm", "large", device="H100")
    assert base == configs.DEFAULTS["fp8_gemm"]["large"]
    assert configs.get_config("fp8_gemm", "no-such-class", device="H100")  # falls back, never fails
    monkeypatch.setitem(configs.TUNED, "fp8_gemm", {"large": {"H200": {"num_stages": 5}}})
    assert configs.get_config("fp8_gemm", "large", device="H200")["num_stages"] == 5
    assert configs.get_config("fp8_gemm", "large", device="H100")["num_stages"] == base["num_stages"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"fp8_gemm": {"large": {"default": {"BLOCK_M": 64}}}}))
    monkeypatch.setenv("STAGGER_KERNEL_CONFIGS", str(path))
    configs._user_table.cache_clear()
    try:
        assert configs.get_config("fp8_gemm", "large", device="H100")["BLOCK_M"] == 64
    finally:
        configs._user_table.cache_clear()


def test_every_default_is_launchable():
    for kernel, classes in configs.DEFAULTS.items():
        for cfg in classes.values():
            assert cfg["num_warps"] in (1, 2, 4, 8, 16)
            if "BLOCK_K" in cfg and kernel.startswith(("fp8", "moe_fp8")):
                assert 128 % cfg["BLOCK_K"] == 0
    assert configs.bucket(5, (16, 64), "m") == "m<=16" and configs.bucket(65, (16, 64), "m") == "large"


@pytest.mark.parametrize("name", ["bench_mla_decode", "bench_fused_moe", "bench_fp8_gemm"])
def test_bench_scripts_parse_and_list_on_cpu(name, capsys):
    mod = importlib.import_module(f"bench.{name}")
    mod.main(["--list"])
    assert capsys.readouterr().out.count("\n") >= 3
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            mod.main([])
        assert "no CUDA device" in str(e.value.code)


def test_ops_triton_branches_dispatch():
    from kernels import ops
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 32, generator=g), torch.rand(32, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="triton"), ops.rms_norm(x, w, 1e-6))
    logits, bias = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    kw = dict(top_k=2, n_group=4, topk_group=2, norm_topk_prob=True, scaling=1.0)
    assert torch.equal(ops.route_v3(logits, bias, backend="triton", **kw)[1].sort(-1).values,
                       ops.route_v3(logits, bias, **kw)[1].sort(-1).values)
    w13, w2 = torch.randn(2, 32, 32, generator=g), torch.randn(2, 32, 16, generator=g)
    ids, tw = torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2, generator=g)
    torch.testing.assert_close(ops.fused_moe(x, w13, w2, ids, tw, backend="triton"),
                               ops.fused_moe(x, w13, w2, ids, tw), atol=1e-5, rtol=1e-5)
    cache, cache_ref = torch.zeros(2, 4, 40), torch.zeros(2, 4, 40)
    lat, pe, slots = torch.randn(3, 32, generator=g), torch.randn(3, 8, generator=g), torch.tensor([0, 5, 7])
    ops.write_kv(cache, lat, pe, slots, backend="triton")
    ops.write_kv(cache_ref, lat, pe, slots)
    assert torch.equal(cache, cache_ref)
    q, table = torch.randn(2, 2, 40, generator=g), torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    args = (q, cache, table, [6, 3], [0, 1, 2], 0.2, 32)
    torch.testing.assert_close(ops.mla_decode(*args, backend="triton"), ops.mla_decode(*args),
                               atol=1e-5, rtol=1e-5)
    qp, kp, vp = (torch.randn(4, 2, 24, generator=g), torch.randn(6, 2, 24, generator=g),
                  torch.randn(6, 2, 16, generator=g))
    pargs = (qp, kp, vp, [0, 3, 4], [0, 3, 6], 0.3)
    torch.testing.assert_close(ops.prefill_attention(*pargs, backend="triton"), ops.prefill_attention(*pargs),
                               atol=1e-5, rtol=1e-5)


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """AOT-compile the kernels for sm_90 (no GPU needed: triton ships ptxas) at V3 shapes with the
    default configs: catches what the interpreter never sees (illegal dot shapes, compile-time
    type errors, register spills). One case per kernel, to stay quick."""
    import os
    import subprocess
    import sys

    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bindir, "ptxas")):
        pytest.skip("this triton wheel carries no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    only = "rmsnorm,router,fp8_gemm M=4096,T=4096,kv_write,H=16 L=1,H=128,prefill"
    r = subprocess.run([sys.executable, "-m", "bench.compile_check", "--fail-on-spill", "--only", only],
                       cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and r.stdout.count("\n") >= 14, r.stdout
    # the compute-bound kernels must reach Hopper's wgmma (fp8 flavour where the inputs are fp8)
    lines = r.stdout.splitlines()
    for case, kernel, fp8 in [("fp8_gemm M=4096", "fp8_block_gemm", True),
                              ("moe_fp8 T=4096", "moe_gate_up", True),
                              ("moe_bf16 T=4096", "moe_down", False), ("prefill", "prefill", False),
                              ("mla_decode H=128", "stage1", False)]:
        line = next(ln for ln in lines if ln.startswith(case) and kernel in ln)
        wgmma = line.split()[-4]
        assert wgmma != "0" and (("(fp8)" in wgmma) == fp8), line
