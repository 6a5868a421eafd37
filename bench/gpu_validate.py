"""The one command a GPU hour runs (issue 14): stages in order of value, each in its own subprocess
with its own time budget, each appending JSON lines to OUT/gpu_results.jsonl as it finishes, and a
summary table last. Whole run under 8 minutes on one H200 with nothing installed beyond the GPU
machine's own torch/triton/transformers.

    python -m bench.gpu_validate [--out DIR] [--stages 0,1,2,3,4,5,6] [--dry-run]

OUT defaults to $OUT, else ./gpu_results. Stages:
  0 environment: versions, device, measured copy bandwidth and bf16 GEMM rate
  1 kernel tests compiled for real (STAGGER_TEST_DEVICE=cuda: fp32/fp16/bf16/fp8, NaN-poisoned outputs)
  2 engine parity on tiny V3, V2 and FP8: GPU vs CPU greedy tokens, static decode through CUDA graphs
    (captured buckets, replays) vs eager and vs static decode without graphs
  3 teacher-forced logits vs transformers, both bf16 on the GPU
  4 end-to-end decode at batch 1/8/64 on a few-layer Moonlight-width model (weights generated on the
    GPU): step time vs roofline, profiler summary (busy fraction, syncs per step, top kernels),
    transformers' generate side by side
  5 kernel microbenchmarks timed through CUDA-graph replays (MLA decode, fused MoE, FP8 GEMM)
  6 bench/compile_check.py (SASS: spills, wgmma)
`--dry-run` runs the same driver and stages on CPU with tiny shapes under the Triton interpreter
(tests/test_gpu_validate.py runs it, so this script cannot rot unnoticed).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = {0: 25, 1: 110, 2: 60, 3: 30, 4: 140, 5: 45, 6: 45}          # 455 s on the GPU
DRY_BUDGET_S = {0: 20, 1: 60, 2: 60, 3: 40, 4: 60, 5: 40, 6: 60}
NAMES = {0: "environment", 1: "kernel tests", 2: "engine parity", 3: "logits vs transformers",
         4: "e2e decode", 5: "kernel microbench", 6: "compile check"}


class Stage:
    """What one stage records: JSON lines tagged with the stage, flushed as they are written."""

    def __init__(self, out: str, stage: int, dry: bool):
        self.path, self.stage, self.dry = os.path.join(out, "gpu_results.jsonl"), stage, dry
        import torch
        self.torch = torch
        self.dev = torch.device("cpu" if dry else "cuda")

    def record(self, **fields) -> None:
        line = dict(stage=self.stage, name=NAMES[self.stage], dry_run=self.dry, **fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()


# ---- stages --------------------------------------------------------------------------------------
def stage0(s: Stage):
    import platform
    import torch
    import triton
    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if s.dry:
        a = torch.empty(1 << 24, dtype=torch.uint8)
        b = torch.empty_like(a)
        t = time.perf_counter()
        b.copy_(a)
        info.update(device="cpu", copy_gbps=2 * a.numel() / (time.perf_counter() - t) / 1e9)
    else:
        from bench._gpu import device_banner
        peaks = device_banner()
        info.update(device=peaks["name"], sms=peaks["sms"], copy_gbps=peaks["copy_gbps"],
                    bf16_tflops=peaks["bf16_tflops"], cuda=torch.version.cuda)
    s.record(**info)


def stage1(s: Stage):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if s.dry:   # the CPU CI already runs them all; here one quick file keeps the path alive
        args, env["STAGGER_TEST_DEVICE"] = ["tests/test_kernels_rmsnorm.py", "-k", "single_token"], "cpu"
    else:
        files = sorted(os.listdir(os.path.join(ROOT, "tests")))
        args = ["tests/" + f for f in files if f.startswith("test_kernels_")]
        env["STAGGER_TEST_DEVICE"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    xml = os.path.join(tempfile.mkdtemp(), "junit.xml")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True)
    import xml.etree.ElementTree as ET
    counts, failed = dict(tests=0, failures=0, errors=0, skipped=0), []
    if os.path.exists(xml):
        root = ET.parse(xml).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    s.record(rc=p.returncode, seconds=round(time.perf_counter() - t, 1), **counts, failed=failed[:40],
             tail=p.stdout[-1500:])


def _checkpoint(preset: str, fp8: bool = False) -> str:
    from launch.make_checkpoint import make_checkpoint
    return make_checkpoint(os.path.join(tempfile.mkdtemp(), preset), preset, fp8=fp8, tokenizer="none")


def _greedy(path, prompts, n, keep=False, **opts):
    """Greedy tokens; `n` is one max_tokens for all prompts or one per prompt. keep: also the LLM."""
    from engine import LLM, SamplingParams
    llm = LLM(path, kv_block_size=16, num_kv_blocks=64, **opts)
    lens = n if isinstance(n, list) else [n] * len(prompts)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in lens])
    tokens = [o.token_ids for o in outs]
    return (tokens, llm) if keep else tokens


def _same_prefix(a, b):
    return sum(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b))


def stage2(s: Stage):
    from engine.config import EngineConfig
    prompts = [list(range(3, 3 + n)) for n in (1, 7, 23, 40)]
    static = "static_decode" in EngineConfig.__dataclass_fields__
    presets = [("tiny-v3", False)] if s.dry else [("tiny-v3", False), ("tiny-v2", False), ("tiny-v3", True)]
    for preset, fp8 in presets:
        path = _checkpoint(preset, fp8)
        # unequal lengths: the decode batch shrinks 4 -> 3 -> 2 -> 1 (static decode buckets 4, 2, 1)
        n = [4, 3, 2, 1] if s.dry else [16, 12, 8, 4]
        ref = _greedy(path, prompts, n, device="cpu", dtype="float32")
        rec = dict(preset=preset + ("-fp8" if fp8 else ""), tokens=sum(n))
        backend = "torch" if s.dry else "triton"
        dev = str(s.dev)
        got = _greedy(path, prompts, n, device=dev, dtype="float32", attention_backend=backend,
                      moe_backend=backend)
        rec["device_vs_cpu_fp32_same_prefix"] = _same_prefix(got, ref)
        if static:
            # on CUDA (triton kernels, one rank) static decode captures and replays CUDA graphs
            g2, llm = _greedy(path, prompts, n, keep=True, device=dev, dtype="float32",
                              attention_backend=backend, moe_backend=backend, static_decode=True)
            rec["static_vs_eager_same_prefix"] = _same_prefix(g2, got)
            sd = llm.engine.worker.runner.static
            if hasattr(sd, "graphs"):
                rec.update(graph_buckets_captured=sorted(sd.graphs), graph_replays=sd.replays,
                           graph_blocker=sd.blocker or None, graphs_used=bool(sd.replays))
                if sd.use_graphs:
                    rec["graphs_vs_eager_same_prefix"] = rec["static_vs_eager_same_prefix"]
                    g3 = _greedy(path, prompts, n, device=dev, dtype="float32", attention_backend=backend,
                                 moe_backend=backend, static_decode=True, cuda_graphs=False)
                    rec["static_eager_vs_eager_same_prefix"] = _same_prefix(g3, got)
                    rec["graphs_vs_static_eager_same_prefix"] = _same_prefix(g2, g3)
            del llm
        if not s.dry:
            b16 = _greedy(path, prompts, n, device=dev, dtype="bfloat16")
            rec["device_bf16_vs_cpu_fp32_same_prefix"] = _same_prefix(b16, ref)
        s.record(**rec)


def stage3(s: Stage):
    import torch
    import transformers
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from reference import dense_meta, make_hf_checkpoint
    from model.loader import load_model
    path = tempfile.mkdtemp()
    make_hf_checkpoint(path, {"qk_rope_head_dim": 16}, std=0.1)
    dtype = torch.float32 if s.dry else torch.bfloat16
    L = 64 if s.dry else 300
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).to(s.dev).eval()
    seq = torch.randint(2, 256, (L,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = {}
    for backend in ("torch",) if s.dry else ("torch", "triton"):
        ours = load_model(path, dtype=dtype, device=s.dev)
        ours.set_backend(attention=backend, moe=backend)
        meta, nb = dense_meta([L], device=s.dev)
        caches = [torch.zeros(nb, 16, ours.cfg.kv_cache_dim, dtype=dtype, device=s.dev)
                  for _ in range(ours.cfg.num_hidden_layers)]
        with torch.no_grad():
            ref = hf(torch.tensor([seq], device=s.dev)).logits[0].float()
            out = ours.compute_logits(ours(torch.tensor(seq, device=s.dev), meta, caches)).float()
        per_pos = ((out - ref).abs().amax(-1) / max(1.0, ref.abs().max().item())).cpu()
        rows[backend] = dict(frac_pos_within_1pct=(per_pos <= 0.01).float().mean().item(),
                             p99_rel=per_pos.quantile(0.99).item(),
                             argmax_agree=(out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    s.record(dtype=str(dtype), positions=L, **rows)


def _moonlight_like(layers: int, dev, dry: bool) -> str:
    """Moonlight-width model with a few layers; weights drawn on the device, then written once."""
    import torch
    from launch.make_checkpoint import PRESETS, _COMMON, write_checkpoint
    raw = dict(_COMMON, **PRESETS["tiny-v3" if dry else "moonlight"])
    raw["num_hidden_layers"] = layers
    g = torch.Generator(device=dev).manual_seed(0)

    def tensor(name):
        shape = next(sh for n, sh in shapes if n == name)
        if name.endswith("e_score_correction_bias"):
            return (0.1 * torch.randn(shape, generator=g, device=dev)).cpu()
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, generator=g, device=dev)).to(torch.bfloat16).cpu()
        return (torch.randn(shape, generator=g, device=dev) * shape[1] ** -0.5).to(torch.bfloat16).cpu()
    from model.config import parse_config
    from model.layout import checkpoint_shapes
    shapes = list(checkpoint_shapes(parse_config(raw)))
    out = os.path.join(tempfile.mkdtemp(), "moonlight-like")
    write_checkpoint(out, raw, dtype=torch.bfloat16, tensors=tensor)
    return out


def stage4(s: Stage):
    import torch
    from engine import LLM, SamplingParams
    from model.config import load_config
    from bench.e2e import copy_gbps, decode_bytes
    path = _moonlight_like(2 if s.dry else 4, s.dev, s.dry)
    cfg = load_config(path)
    gbps = copy_gbps(s.dev)
    ctx, out_len = (16, 4) if s.dry else (256, 32)
    # a fixed KV pool: transformers' copy of the model must still fit beside it later
    llm = LLM(path, device=str(s.dev), dtype="float32" if s.dry else "bfloat16", max_num_seqs=64,
              max_num_batched_tokens=8192, kv_block_size=16 if s.dry else 64,
              num_kv_blocks=64 if s.dry else 1024)
    g = torch.Generator().manual_seed(0)
    for batch in ((2,) if s.dry else (1, 8, 64)):
        prompts = [torch.randint(2, cfg.vocab_size, (ctx,), generator=g).tolist() for _ in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))   # warm-up
        n0 = len(llm.coordinator.steps)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t
        steps = [st.step_time_s for st in llm.coordinator.steps[n0:] if st.tokens_per_rank[0] == batch]
        step_s = sorted(steps)[len(steps) // 2] if steps else float("nan")
        elem = 4 if s.dry else 2
        roof = decode_bytes(cfg, batch, ctx + out_len // 2, elem) / (gbps * 1e9)
        rec = dict(batch=batch, tok_s=sum(len(o.token_ids) for o in outs) / wall, step_ms=step_s * 1e3,
                   roofline_ms=roof * 1e3, step_over_roofline=step_s / roof)
        rec.update(_profile_decode(llm, prompts, s))
        s.record(**rec)
    if not s.dry:
        from bench.offline import run_transformers
        prompts = [torch.randint(2, cfg.vocab_size, (ctx,), generator=g).tolist() for _ in range(8)]
        n, wall = run_transformers(path, prompts, 16, 8, s.dev, torch.bfloat16)
        s.record(transformers_tok_s_batch8=n / wall)


def _profile_decode(llm, prompts, s: Stage) -> dict:
    """A few decode steps under the profiler and the sync counter."""
    import torch
    from engine import SamplingParams
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, sp)
    eng.step()   # prefill
    PA = torch.profiler.ProfilerActivity
    acts = [PA.CPU] + ([PA.CUDA] if not s.dry else [])
    from bench.host_syncs import HostSyncCounter
    with HostSyncCounter() as sc, torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(3):
            eng.step()
        s.sync()
        wall = time.perf_counter() - t
    while eng.has_unfinished():
        eng.step()
    ev = prof.key_averages()
    res = dict(host_syncs_per_step=(sc.d2h + sc.h2d) / 3, profiled_ms_per_step=wall / 3 * 1e3,
               sync_sites=sorted(sc.sites)[:8])
    if not s.dry:
        kern = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kern) / 1e3
        res["gpu_busy_frac"] = busy / (wall * 1e3)
        res["stream_syncs_per_step"] = sum(e.count for e in ev if "Synchronize" in e.key) / 3
        launch = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        res["kernel_launches_per_step"] = sum(e.count for e in ev if e.key in launch) / 3
        top = sorted(kern, key=lambda e: -e.self_device_time_total)[:6]
        res["top_kernels"] = [(e.key[:60], round(e.self_device_time_total / 3e3, 3)) for e in top]
    else:
        res["ops_per_step"] = sum(e.count for e in ev) / 3
    return res


def _graph_ms(fn, dev, reps=20):
    """Median-free mean of graph replays (launch overhead excluded); eager timing on CPU."""
    import torch
    if dev.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        graph.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps


def stage5(s: Stage):
    for name, fn in (("mla_decode", _bench_mla), ("fused_moe", _bench_moe), ("fp8_gemm", _bench_fp8)):
        try:   # one kernel failing (e.g. a host sync inside graph capture) must not hide the others
            fn(s, _peaks(s))
        except Exception as e:   # noqa: BLE001
            s.record(kernel=name, error=f"{type(e).__name__}: {str(e)[:400]}")


_PEAKS = {}


def _peaks(s: Stage) -> dict:
    if not s.dry and not _PEAKS:
        from bench._gpu import measure_bf16_tflops, measure_copy_gbps
        _PEAKS.update(copy_gbps=measure_copy_gbps(), bf16_tflops=measure_bf16_tflops())
    return _PEAKS


def _bench_mla(s: Stage, peaks: dict):
    import torch
    from kernels.mla_decode_triton import mla_decode_triton
    dev, dry = s.dev, s.dry
    dt = torch.float32 if dry else torch.bfloat16
    # MLA decode: 16 heads, batch 64 x 4096 context (dry: 2 x 32), latent 512 + 64, page 64
    B, S, H, page = (2, 32, 16, 16) if dry else (64, 4096, 16, 64)
    d = 576
    nb = B * S // page
    cache = torch.randn(nb, page, d, device=dev, dtype=dt)
    table = torch.arange(nb, device=dev, dtype=torch.int32).view(B, S // page)
    q = torch.randn(B, H, d, device=dev, dtype=dt)
    lens, qsl = [S] * B, list(range(B + 1))
    # device copies of the lengths made before capture: no host-to-device copy inside the graph
    step = {"seq_lens_i32": torch.tensor(lens, dtype=torch.int32, device=dev),
            "query_start_loc_i32": torch.tensor(qsl, dtype=torch.int32, device=dev)}
    ms = _graph_ms(lambda: mla_decode_triton(q, cache, table, lens, qsl, 0.1, 512, cache=step), dev)
    kv_bytes = B * S * d * cache.element_size()
    rec = dict(kernel="mla_decode", batch=B, context=S, heads=H, ms=ms, gbps=kv_bytes / ms / 1e6)
    if peaks:
        rec["frac_of_copy_bw"] = rec["gbps"] / (peaks["copy_gbps"] / 2)   # copy counts read + write
    s.record(**rec)


def _bench_moe(s: Stage, peaks: dict):
    import torch
    from kernels.moe_triton import fused_moe_triton
    dev, dry = s.dev, s.dry
    dt = torch.float32 if dry else torch.bfloat16
    # fused MoE: 4096 tokens, 64 experts top-6, hidden 2048, inter 1408 (dry: 8 tokens, tiny)
    T, E, k, Hd, Di = (8, 4, 2, 64, 32) if dry else (4096, 64, 6, 2048, 1408)
    x = torch.randn(T, Hd, device=dev, dtype=dt)
    w13 = torch.randn(E, 2 * Di, Hd, device=dev, dtype=dt) * Hd ** -0.5
    w2 = torch.randn(E, Hd, Di, device=dev, dtype=dt) * Di ** -0.5
    ids = torch.randint(0, E, (T, k), device=dev)
    w = torch.rand(T, k, device=dev)
    ms = _graph_ms(lambda: fused_moe_triton(x, w13, w2, ids, w), dev)
    tflops = 2 * T * k * 3 * Hd * Di / ms / 1e9
    rec = dict(kernel="fused_moe", tokens=T, experts=E, top_k=k, ms=ms, tflops=tflops)
    if peaks:
        rec["frac_of_bf16_peak"] = tflops / peaks["bf16_tflops"]
    s.record(**rec)


def _bench_fp8(s: Stage, peaks: dict):
    import torch
    from kernels.fp8 import quant_block_fp8
    from kernels.fp8_triton import fp8_block_gemm_triton
    dev, dry = s.dev, s.dry
    dt = torch.float32 if dry else torch.bfloat16
    # FP8 block GEMM vs bf16 matmul at M=4096, N=K=7168 (dry: 16 x 128 x 128)
    M, N, K = (16, 128, 128) if dry else (4096, 7168, 7168)
    a = torch.randn(M, K, device=dev, dtype=dt)
    wf = torch.randn(N, K, device=dev) * K ** -0.5
    wq, ws = quant_block_fp8(wf)
    ms8 = _graph_ms(lambda: fp8_block_gemm_triton(a, wq, ws), dev)
    wb = wf.to(dt)
    ms16 = _graph_ms(lambda: a @ wb.t(), dev)
    s.record(kernel="fp8_gemm", m=M, n=N, k=K, fp8_ms=ms8, bf16_ms=ms16, speedup_vs_bf16=ms16 / ms8,
             fp8_tflops=2 * M * N * K / ms8 / 1e9)


def stage6(s: Stage):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    args = ["--only", "rmsnorm"] if s.dry else []
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bench.compile_check", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    lines = p.stdout.splitlines()
    s.record(rc=p.returncode, seconds=round(time.perf_counter() - t, 1),
             compile_failed=sum("COMPILE FAILED" in ln for ln in lines), table=lines[:60],
             stderr_tail=p.stderr[-800:])


STAGES = {0: stage0, 1: stage1, 2: stage2, 3: stage3, 4: stage4, 5: stage5, 6: stage6}


# ---- driver --------------------------------------------------------------------------------------
def run_stage(i: int, out: str, dry: bool) -> None:
    s = Stage(out, i, dry)
    STAGES[i](s)


def summary(out: str, results: dict) -> str:
    rows = [f"{'stage':<26} {'status':<9} {'s':>6}  figures"]
    lines = []
    path = os.path.join(out, "gpu_results.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
    skip = {"stage", "name", "dry_run", "tail", "table", "failed", "stderr_tail", "top_kernels", "sync_sites"}
    for i, (status, secs) in results.items():
        figs = []
        for ln in lines:
            if ln["stage"] == i:
                figs.append(", ".join(f"{k}={_fmt(v)}" for k, v in ln.items() if k not in skip)[:160])
        rows.append(f"{f'{i} {NAMES[i]}':<26} {status:<9} {secs:6.1f}  " + (" | ".join(figs) or "-"))
    return "\n".join(rows)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_results"))
    ap.add_argument("--stages", default="0,1,2,3,4,5,6")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)   # one stage, in-process
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.stage is not None:
        return run_stage(a.stage, a.out, a.dry_run)
    # a loaded CI machine may stretch the dry run's budgets (GPU_VALIDATE_BUDGET_SCALE)
    scale = float(os.environ.get("GPU_VALIDATE_BUDGET_SCALE", 1))
    budgets = {k: v * scale for k, v in (DRY_BUDGET_S if a.dry_run else BUDGET_S).items()}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    results = {}
    for i in [int(x) for x in a.stages.split(",") if x.strip()]:
        t = time.perf_counter()
        log = os.path.join(a.out, f"stage{i}.log")
        cmd = [sys.executable, "-m", "bench.gpu_validate", "--stage", str(i), "--out", a.out]
        cmd += ["--dry-run"] if a.dry_run else []
        try:
            with open(log, "w") as f:
                p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=budgets[i])
            status = "ok" if p.returncode == 0 else f"rc={p.returncode}"
        except subprocess.TimeoutExpired:
            status = "timeout"
        secs = time.perf_counter() - t
        results[i] = (status, secs)
        if status != "ok":
            with open(log) as f:
                tail = f.read()[-1500:]
            with open(os.path.join(a.out, "gpu_results.jsonl"), "a") as f:
                f.write(json.dumps(dict(stage=i, name=NAMES[i], dry_run=a.dry_run, status=status,
                                        seconds=round(secs, 1), log_tail=tail)) + "\n")
        print(f"[gpu_validate] stage {i} ({NAMES[i]}): {status} in {secs:.1f} s", flush=True)
    table = summary(a.out, results)
    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0 if all(st == "ok" for st, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
