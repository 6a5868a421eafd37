"""Launch configurations of the Triton kernels, kept as data.

A config is looked up by (kernel, shape class, device). The device is a short name taken from
`torch.cuda.get_device_name()` ("H100", "H200", ...); a missing entry falls back to the
kernel's "default" device entry, so nothing ever needs a tuning run to work. Tuned figures go into
`TUNED` (or a JSON file named by the environment variable STAGGER_KERNEL_CONFIGS, same layout:
{"kernel": {"shape_class": {"device": {...}}}}), never into the kernels.

Under the Triton interpreter (TRITON_INTERPRET=1, the CPU test path) every kernel gets exactly one
config from `INTERPRET`: large tiles, because the interpreter's cost is per program per loop
step, and no multi-config autotuning, which fails on CPU.
"""
from __future__ import annotations

import functools
import json
import os

# ---------------------------------------------------------------------------------------------
# Defaults: sane Hopper (H100/H200) settings per kernel and shape class, checked to compile for
# sm_90 without register spills (bench/compile_check.py); not yet timed on a GPU.
# Keys inside a config: tile sizes in capitals (constexpr kernel args), plus num_warps/num_stages.
# ---------------------------------------------------------------------------------------------
DEFAULTS: dict[str, dict[str, dict]] = {
    # one row per program; the row is held in registers, so warps scale with the row length
    "rmsnorm": {"default": dict(num_warps=8, num_stages=1)},
    "router": {"default": dict(num_warps=4, num_stages=1)},
    # a program quantizes GROUPS_PER_PROG 128-groups of one row: 16 B loads, one pass
    "fp8_quant": {"default": dict(GROUPS_PER_PROG=8, num_warps=4, num_stages=1)},
    # BLOCK_K must divide the 128-wide scale block (one activation/weight scale per K step)
    "fp8_gemm": {
        "m<=16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=5),
        "m<=64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        "m<=256": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    },
    # fused MoE: shape class by the mean number of routed rows per local expert; BLOCK_M is also the
    # padding unit of the token sort. FP8 needs BLOCK_N == BLOCK_K == 128 (scale blocks; the
    # gate/up epilogue quantizes its 128-wide output tile as one activation group).
    "moe_bf16": {
        "rows<=16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        "rows<=64": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4),
        "rows<=256": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    },
    "moe_fp8": {
        "rows<=16": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        "rows<=64": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4),
        # 8 warps: the fp8 path keeps each dot's result apart from its accumulator to scale it,
        # and a 128-row tile (or 4 warps) spills in the gate/up kernel (bench/compile_check)
        "rows<=256": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
        "large": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    },
    "moe_sum": {"default": dict(BLOCK_H=1024, num_warps=4, num_stages=1)},
    "kv_write": {"default": dict(num_warps=4, num_stages=1)},
    # absorbed MLA decode. BLOCK_M rows = (query token, head) pairs sharing each loaded KV tile.
    # <= 32 rows (16 heads, one token): mma.sync tiles, 8 warps, ~128-176 registers, so two
    # programs fit an SM and 3 stages of KV loads are in flight. 64 rows (128 heads, or 16 heads x
    # 4 MTP tokens): Hopper wgmma with operands in shared memory, the 64 x 512 fp32 accumulator
    # split across two warpgroups. All three compile for sm_90 without spills (bench/compile_check).
    # MIN_SPLIT_TOKENS bounds how finely one sequence's context is split across programs (each
    # split costs a 512-wide fp32 partial row per (token, head) in stage 2); stage 1 aims at
    # WAVES x (number of SMs) programs (the interpreter config gives a fixed TARGET_PROGRAMS).
    "mla_decode": {
        "rows<=16": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=3,
                         MIN_SPLIT_TOKENS=256, WAVES=2, MAX_SPLITS=64),
        "rows<=32": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3,
                         MIN_SPLIT_TOKENS=256, WAVES=2, MAX_SPLITS=64),
        "large": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2,
                      MIN_SPLIT_TOKENS=256, WAVES=2, MAX_SPLITS=64),
    },
    "mla_merge": {"default": dict(num_warps=4, num_stages=1)},
    # varlen causal flash attention (expanded MLA prefill): shape class by padded qk head dim
    "prefill": {
        "d<=64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        "d<=128": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        "d<=256": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    },
}

# Per-device tuned entries: TUNED[kernel][shape_class][device] = config (merged over DEFAULTS).
# Empty until bench/ runs on the target GPUs produce figures worth keeping.
TUNED: dict[str, dict[str, dict[str, dict]]] = {}

# One config per kernel under the interpreter: big tiles, few programs, few loop steps.
INTERPRET: dict[str, dict] = {
    "rmsnorm": dict(num_warps=4, num_stages=1),
    "router": dict(num_warps=4, num_stages=1),
    "fp8_quant": dict(GROUPS_PER_PROG=16, num_warps=4, num_stages=1),
    "fp8_gemm": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=1),
    "moe_bf16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1),
    "moe_fp8": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1),
    "moe_sum": dict(BLOCK_H=1024, num_warps=4, num_stages=1),
    "kv_write": dict(num_warps=4, num_stages=1),
    "mla_decode": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1,
                       MIN_SPLIT_TOKENS=32, TARGET_PROGRAMS=8, MAX_SPLITS=4),
    "mla_merge": dict(num_warps=4, num_stages=1),
    "prefill": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
}


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# the order matters: "H20" is a substring of "H200"
_KNOWN_DEVICES = ("H200", "H100", "H800", "H20", "GH200", "A100", "A800", "L40S", "L4")


@functools.lru_cache(maxsize=None)
def device_name(index: int = 0) -> str:
    """Short name of a CUDA device ("H100", ...), "interpreter" under TRITON_INTERPRET, or "cpu"."""
    if is_interpreting():
        return "interpreter"
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    full = torch.cuda.get_device_name(index)
    for key in sorted(_KNOWN_DEVICES, key=len, reverse=True):
        if key in full:
            return key
    return full


@functools.lru_cache(maxsize=None)
def _user_table() -> dict:
    path = os.environ.get("STAGGER_KERNEL_CONFIGS")
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def get_config(kernel: str, shape_class: str = "default", device: str | None = None) -> dict:
    """The launch config of `kernel` for a shape class on a device (a fresh dict, safe to edit)."""
    if is_interpreting():
        return dict(INTERPRET[kernel])
    classes = DEFAULTS[kernel]
    base = classes.get(shape_class) or classes.get("default") or next(iter(classes.values()))
    cfg = dict(base)
    device = device or device_name()
    for table in (TUNED, _user_table()):
        per_class = table.get(kernel, {}).get(shape_class, {})
        cfg.update(per_class.get("default", {}))
        cfg.update(per_class.get(device, {}))
    return cfg


def bucket(value: int, bounds: tuple[int, ...], prefix: str) -> str:
    """Shape class "<prefix><=b" for the first bound b >= value, else "large"."""
    for b in bounds:
        if value <= b:
            return f"{prefix}<={b}"
    return "large"


def launch_kwargs(cfg: dict) -> dict:
    """The part of a config that Triton's launcher takes (the rest are constexpr kernel args)."""
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
