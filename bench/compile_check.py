"""Compile every Triton kernel for Hopper (sm_90a) on a machine WITHOUT a GPU and report what the
compiler made of it: registers, local-memory spills, shared memory, which tensor-core
instructions the SASS uses (HGMMA/QGMMA = Hopper wgmma, HMMA = older mma.sync) and whether global
loads are pipelined (LDGSTS = cp.async, UTMALDG = TMA).

    python -m bench.compile_check [--only moe,mla] [--keep DIR]

The interpreter (CPU tests) checks numerics but never compiles; this catches what only the real
compiler sees (illegal dot shapes, type errors, register spills, a missing wgmma) before a GPU is
at hand. Kernels are captured from the real wrappers called on `meta` tensors at DeepSeek-V3
shapes, so the launch configs, constexprs and the argument specialization (16-divisible ints and
aligned pointers, ints equal to 1 as constants) are those a real launch would use. It needs the
ptxas/cuobjdump that ship inside the triton wheel; the GPU machines' own triton may differ.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (it compiles for the GPU, not the interpreter)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    from bench import _gpu  # noqa: F401  (puts the repo root on sys.path)
except ImportError:
    import _gpu  # noqa: F401

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.float8_e4m3fn: "*fp8e4nv", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.sink.append((self.fn, args, kw))
        return launch


def _signature(fn, args, kw):
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in kw:
            v = kw[name]
        elif i < len(args):
            v = args[i]
        else:
            raise TypeError(f"{fn.__name__}: no value for {name}")
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1  # what a launch specializes too
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: {type(v)}")
    opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    return sig, consts, attrs, opts


def _sass_report(cubin: bytes, keep_dir: str | None, tag: str) -> dict:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(keep_dir or d, f"{tag}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", res)) else -1  # noqa: E731
    count = lambda op: len(re.findall(r"\b" + op + r"\b", sass))  # noqa: E731
    return dict(regs=get("REG"), stack=get("STACK"), local_ops=count("STL") + count("LDL"),
                hgmma=count("HGMMA"), qgmma=count("QGMMA"), hmma=count("HMMA"),
                ldgsts=count("LDGSTS"), tma=count("UTMALDG"))


def cases():
    """(name, thunk) pairs: each thunk calls a wrapper on meta tensors at a V3 shape."""
    meta = dict(device="meta")
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    from kernels import (fp8_triton, kv_write_triton, mla_decode_triton, moe_triton, prefill_triton,
                         rmsnorm_triton, router_triton)
    yield "rmsnorm+residual", lambda: rmsnorm_triton.rmsnorm_triton(
        torch.empty(4096, 7168, dtype=bf16, **meta), torch.empty(7168, dtype=bf16, **meta), 1e-6,
        torch.empty(4096, 7168, dtype=bf16, **meta))
    yield "router_v3", lambda: router_triton.route_v3_triton(
        torch.empty(64, 256, **meta), torch.empty(256, **meta), top_k=8, n_group=8, topk_group=4,
        norm_topk_prob=True, scaling=2.5)
    yield "fp8_group_quant", lambda: fp8_triton.per_token_group_quant_fp8_triton(
        torch.empty(4096, 7168, dtype=bf16, **meta))
    for m in (16, 4096):
        yield f"fp8_gemm M={m}", lambda m=m: fp8_triton.fp8_block_gemm_triton(
            torch.empty(m, 7168, dtype=fp8, **meta), torch.empty(18432, 7168, dtype=fp8, **meta),
            torch.empty(144, 56, **meta), x_scale=torch.empty(m, 56, **meta))
    for t in (16, 4096, 16384):
        for mode in ("bf16", "fp8"):
            def moe(t=t, mode=mode):
                x = torch.empty(t, 7168, dtype=bf16, **meta)
                ids = torch.empty(t, 8, dtype=torch.int64, **meta)
                w = torch.empty(t, 8, **meta)
                wd = fp8 if mode == "fp8" else bf16
                w13 = torch.empty(256, 4096, 7168, dtype=wd, **meta)
                w2 = torch.empty(256, 7168, 2048, dtype=wd, **meta)
                s13 = torch.empty(256, 32, 56, **meta) if mode == "fp8" else None
                s2 = torch.empty(256, 56, 16, **meta) if mode == "fp8" else None
                moe_triton.fused_moe_triton(x, w13, w2, ids, w, s13, s2)
            yield f"moe_{mode} T={t}", moe
    yield "kv_write", lambda: kv_write_triton.write_kv_triton(
        torch.empty(1000, 64, 576, dtype=bf16, **meta), torch.empty(64, 512, dtype=bf16, **meta),
        torch.empty(64, 64, dtype=bf16, **meta), torch.empty(64, dtype=torch.int64, **meta))
    for heads, batch, q_len in ((16, 4, 1), (16, 4, 2), (128, 64, 1)):
        def mla(heads=heads, batch=batch, q_len=q_len):
            q = torch.empty(batch * q_len, heads, 576, dtype=bf16, **meta)
            kv = torch.empty(batch * 64, 64, 576, dtype=bf16, **meta)
            table = torch.empty(batch, 64, dtype=torch.int32, **meta)
            mla_decode_triton.mla_decode_triton(q, kv, table, [4096] * batch,
                                                list(range(0, batch * q_len + 1, q_len)), 0.07, 512)
        yield f"mla_decode H={heads} L={q_len}", mla
    yield "prefill 192/128", lambda: prefill_triton.prefill_attention_triton(
        torch.empty(4096, 128, 192, dtype=bf16, **meta), torch.empty(4096, 128, 192, dtype=bf16, **meta),
        torch.empty(4096, 128, 128, dtype=bf16, **meta), [0, 4096], [0, 4096], 0.07)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument("--keep", default=None, help="directory to keep the cubins in")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any kernel spills registers")
    args = p.parse_args(argv)
    import kernels.fp8_triton as f8
    import kernels.kv_write_triton as kvw
    import kernels.mla_decode_triton as mla
    import kernels.moe_triton as moe
    import kernels.prefill_triton as pf
    import kernels.rmsnorm_triton as rms
    import kernels.router_triton as rt
    modules = (f8, kvw, mla, moe, pf, rms, rt)
    only = [s for s in args.only.split(",") if s]
    target = GPUTarget("cuda", args.arch, 32)
    print(f"# triton {triton.__version__}, target sm_{args.arch}")
    header = ("case", "kernel", "warps", "stages", "regs", "spill", "smem", "wgmma", "mma.sync", "cp.async",
              "tma")
    print("  ".join(f"{h:>10}" if i > 1 else f"{h:<24}" for i, h in enumerate(header)))
    failures = 0
    for name, thunk in cases():
        if only and not any(s in name for s in only):
            continue
        sink = []
        saved = []
        for mod in modules:  # swap every jit function for a recorder while the wrapper runs
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, triton.runtime.jit.JITFunction):
                    saved.append((mod, attr, obj))
                    setattr(mod, attr, _Recorder(obj, sink))
        try:
            thunk()
        finally:
            for mod, attr, obj in saved:
                setattr(mod, attr, obj)
        for fn, a, kw in sink:
            sig, consts, attrs, opts = _signature(fn, a, kw)
            try:
                k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
            except Exception as e:  # report and go on: one broken kernel should not hide the rest
                failures += 1
                print(f"{name:<24}  {fn.__name__:>10}  COMPILE FAILED: {type(e).__name__}: {str(e)[:300]}")
                continue
            r = _sass_report(k.asm["cubin"], args.keep, re.sub(r"\W+", "_", f"{name}_{fn.__name__}"))
            if args.fail_on_spill and (r["stack"] > 0 or r["local_ops"] > 0):
                failures += 1
            wg = r["hgmma"] + r["qgmma"]
            cells = (name, fn.__name__.strip("_")[:22], opts.get("num_warps", 4), opts.get("num_stages", 3),
                     r["regs"], f"{r['stack']}B" if r["stack"] else "0", k.metadata.shared,
                     f"{wg}{'(fp8)' if r['qgmma'] else ''}", r["hmma"], r["ldgsts"], r["tma"])
            print("  ".join(f"{c:>10}" if i > 1 else f"{c:<24}" for i, c in enumerate(cells)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
