"""bench/gpu_validate.py --dry-run: the GPU hour's driver and every stage run on CPU with tiny shapes,
so the script a GPU session depends on cannot rot unnoticed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_every_stage(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GPU_VALIDATE_BUDGET_SCALE="4")
    p = subprocess.run([sys.executable, "-m", "bench.gpu_validate", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    lines = [json.loads(ln) for ln in (tmp_path / "gpu_results.jsonl").read_text().splitlines()]
    by_stage = {}
    for ln in lines:
        assert ln["dry_run"] is True and "status" not in ln, ln   # no stage failed or timed out
        by_stage.setdefault(ln["stage"], []).append(ln)
    assert sorted(by_stage) == list(range(7))
    assert by_stage[1][0]["tests"] >= 1 and by_stage[1][0]["failures"] == 0 and by_stage[1][0]["rc"] == 0
    parity = by_stage[2][0]
    assert parity["device_vs_cpu_fp32_same_prefix"] == parity["tokens"]
    if "static_vs_eager_same_prefix" in parity:
        assert parity["static_vs_eager_same_prefix"] == parity["tokens"]
    assert by_stage[3][0]["torch"]["argmax_agree"] == 1.0          # fp32 on CPU: the same model
    assert all(r["host_syncs_per_step"] >= 1 for r in by_stage[4])  # the sampled ids come back
    assert {r["kernel"] for r in by_stage[5]} == {"mla_decode", "fused_moe", "fp8_gemm"}
    assert not any("error" in r for r in by_stage[5]), by_stage[5]
    assert by_stage[6][0]["rc"] == 0 and by_stage[6][0]["compile_failed"] == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert all(f"{i} " in summary for i in range(7)) and "timeout" not in summary
