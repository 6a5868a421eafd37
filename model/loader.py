"""Load a Hugging Face DeepSeek checkpoint (safetensors, single file or sharded) into the network.

Files are memory-mapped and read one tensor at a time straight into the already allocated
parameter, so the weights are never held twice. Per-expert tensors are copied into the stacked
expert layout; experts this rank does not hold are never read. FP8 block-quantized weights are
either kept (for block-scaled GEMMs) or dequantized at load (for the torch reference path).
"""
import json
import os

import torch
from safetensors import safe_open

from kernels.fp8 import dequant_block_fp8
from .config import ModelConfig, load_config
from .deepseek import DeepseekForCausalLM, Linear
from .layout import EXPERT_RE, LAYER_RE

FP8 = torch.float8_e4m3fn


class CheckpointError(ValueError):
    pass


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """tensor name -> file path, from model.safetensors.index.json or the single/only shard(s)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = {p for p in weight_map.values() if not os.path.isfile(os.path.join(model_dir, p))}
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {sorted(missing)}")
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir!r}")
    names = {}
    for fn in files:
        path = os.path.join(model_dir, fn)
        with safe_open(path, framework="pt") as f:
            names.update({k: path for k in f.keys()})
    return names


class _Reader:
    """Keeps one safetensors handle per file open while loading."""

    def __init__(self, files: dict[str, str]):
        self.files, self.handles = files, {}

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="pt")
        return self.handles[path].get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.files


def _check_shape(name, got, want):
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(got)} in the checkpoint but the model "
                              f"expects {tuple(want)}")


def load_model(model_dir: str, *, dtype=torch.float32, device="cpu", local_experts=None,
               keep_fp8: bool = False) -> DeepseekForCausalLM:
    """Build the network for `model_dir` and fill it. `local_experts` (global ids) limits which
    routed experts this rank loads (expert parallelism); `keep_fp8` keeps FP8 weights quantized."""
    cfg = load_config(model_dir)
    # built straight in `dtype`: an fp32 build on the GPU would double the peak and stay in the
    # caching allocator (the KV pool is sized from free memory next). Rope inv_freq and the V3
    # router bias are created fp32 and stay so (model.deepseek.KeepFp32).
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekForCausalLM(cfg, local_experts)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)
    load_weights(model, model_dir, keep_fp8=keep_fp8)
    return model


def load_weights(model: DeepseekForCausalLM, model_dir: str, keep_fp8: bool = False) -> None:
    cfg: ModelConfig = model.cfg
    reader = _Reader(checkpoint_files(model_dir))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name in reader.files:
        if name.endswith("weight_scale_inv"):
            continue  # read together with its weight
        m = LAYER_RE.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            continue  # the MTP (next-token prediction) layer: not used for plain decoding
        e = EXPERT_RE.match(name)
        if e:
            _load_expert(model, reader, name, e, keep_fp8)
            continue
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint (not part of a "
                                  f"{cfg.model_type} model with this config)")
        _load_dense(model, modules, params[name], reader, name, keep_fp8)
        loaded.add(name)
    missing = [n for n in params if n not in loaded and not n.endswith(("experts.w13", "experts.w2"))]
    if cfg.model_type == "deepseek_v3":
        # older V3-style checkpoints without a correction bias route with a zero bias
        missing = [n for n in missing if not n.endswith("e_score_correction_bias")]
    for moe_i, moe in enumerate(model.moe_layers()):
        want = {(e, p) for e in moe.experts.local_experts for p in ("gate_proj", "up_proj", "down_proj")}
        got = getattr(moe.experts, "_loaded", set())
        if want - got:
            e, p = sorted(want - got)[0]
            missing.append(f"experts.{e}.{p}.weight of MoE layer {moe_i}")
        moe.experts.__dict__.pop("_loaded", None)
    if missing:
        raise CheckpointError(f"checkpoint {model_dir!r} is missing {len(missing)} tensor(s), "
                              f"e.g. {missing[:3]}")


def _make_fp8_slots(experts, block: int) -> None:
    """Swap a layer's expert slots to fp8 storage with per-slot block scales (once)."""
    if experts.w13_scale is not None:
        return
    n, two_i, h = experts.w13.shape
    dev = experts.w13.device

    def sc(r, c):
        return torch.ones(n, -(-r // block), -(-c // block), dtype=torch.float32, device=dev)

    experts.w13 = torch.nn.Parameter(torch.empty(n, two_i, h, dtype=FP8, device=dev),
                                     requires_grad=False)
    experts.w2 = torch.nn.Parameter(torch.empty(n, h, two_i // 2, dtype=FP8, device=dev),
                                    requires_grad=False)
    experts.w13_scale, experts.w2_scale = sc(two_i, h), sc(h, two_i // 2)


def _block(cfg) -> int:
    if cfg.fp8_block is None:
        raise CheckpointError("checkpoint holds float8 tensors but config.json has no quantization_config")
    if cfg.fp8_block[0] != cfg.fp8_block[1]:
        raise CheckpointError("quantization_config.weight_block_size must be square, "
                              f"got {list(cfg.fp8_block)}")
    return cfg.fp8_block[0]


def _scale_of(reader, name):
    sname = name[: -len("weight")] + "weight_scale_inv"
    if not reader.has(sname):
        raise CheckpointError(f"fp8 tensor {name!r} has no {sname!r} beside it")
    return reader.get(sname).float()


def _load_dense(model, modules, param, reader, name, keep_fp8):
    t = reader.get(name)
    _check_shape(name, t.shape, param.shape)
    owner = modules.get(name.rsplit(".", 1)[0])
    if t.dtype == FP8:
        scale = _scale_of(reader, name)
        block = _block(model.cfg)
        if keep_fp8 and isinstance(owner, Linear) and block == 128:  # kernels assume 128x128 blocks
            owner.weight = torch.nn.Parameter(t.to(param.device), requires_grad=False)
            owner.weight_scale_inv = scale.to(param.device)
            return
        t = dequant_block_fp8(t, scale, block, dtype=param.dtype)
    with torch.no_grad():
        param.copy_(t)


def _load_expert(model, reader, name, match, keep_fp8):
    layer, expert, proj, kind = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
    if kind != "weight":
        return
    experts = model.model.layers[layer].mlp.experts
    if expert >= model.cfg.n_routed_experts:
        raise CheckpointError(f"tensor {name!r}: expert {expert} "
                              f">= n_routed_experts={model.cfg.n_routed_experts}")
    slots = [s for s, e in enumerate(experts.slot_experts) if e == expert]
    if not slots:
        return  # held by another rank: never read
    inter = model.cfg.moe_intermediate_size
    t = reader.get(name)
    want = experts.w2.shape[1:] if proj == "down_proj" else (inter, experts.w13.shape[2])
    _check_shape(name, t.shape, want)
    rows = (slice(None) if proj == "down_proj"
            else slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter))
    if t.dtype == FP8:
        scale, block = _scale_of(reader, name), _block(model.cfg)
        # FP8-resident experts (for the w8a8 fused MoE): gate and up scales stack along rows
        # only when the intermediate size is a whole number of blocks
        if keep_fp8 and block == 128 and inter % block == 0:
            _make_fp8_slots(experts, block)
            w, ws = ((experts.w2, experts.w2_scale) if proj == "down_proj"
                     else (experts.w13, experts.w13_scale))
            srows = slice(rows.start // block if rows.start else None,
                          rows.stop // block if rows.stop else None)
            for slot in slots:
                w[slot, rows] = t.to(w.device)
                ws[slot, srows] = scale.to(ws.device)
            experts.__dict__.setdefault("_loaded", set()).add((expert, proj))
            return
        t = dequant_block_fp8(t, scale, block, dtype=experts.w13.dtype)
    if experts.w13_scale is not None:
        raise CheckpointError(f"tensor {name!r} is not FP8 but other experts of its layer are")
    with torch.no_grad():
        for slot in slots:   # a redundant copy fills every slot of the same expert
            (experts.w2 if proj == "down_proj" else experts.w13)[slot, rows].copy_(t)
    experts.__dict__.setdefault("_loaded", set()).add((expert, proj))
