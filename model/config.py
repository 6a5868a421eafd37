"""DeepSeek-V3 / V2 configuration, parsed from a checkpoint's config.json.

Only the fields the network needs are kept; unknown model types and inconsistent values are
rejected with an error that names the field, so a bad checkpoint fails at load, not mid-forward.
"""
import json
import math
import os
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    pass


@dataclass
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"                 # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"          # V3: noaux_tc; V2: greedy | group_limited_greedy
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    fp8_block: tuple[int, int] | None = None   # set for FP8 block-quantized checkpoints

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token in the latent cache (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale**2 when yarn sets mscale_all_dim (DeepSeek's long context)."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.kind == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_from(raw: dict) -> RopeConfig:
    # new transformers: "rope_parameters" holds theta too; old checkpoints: "rope_scaling" + "rope_theta"
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"rope_parameters.rope_type: unsupported {kind!r} (expected default or yarn)")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise ConfigError("rope_parameters.factor: required for yarn rope scaling")
    return RopeConfig(
        theta=float(theta), kind="yarn", factor=float(params["factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                             or raw.get("max_position_embeddings", 4096)),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _require(raw: dict, name: str, kind=int, allow_none=False):
    if name not in raw:
        raise ConfigError(f"config.json: missing required field {name!r}")
    v = raw[name]
    if v is None and allow_none:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (kind is int and int(v) != v):
        raise ConfigError(f"config.json: field {name!r} must be {kind.__name__}, got {v!r}")
    return kind(v)


def parse_config(raw: dict) -> ModelConfig:
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {mt!r} is not supported "
                          f"(expected one of {SUPPORTED_MODEL_TYPES})")
    v3 = mt == "deepseek_v3"
    n_routed = _require(raw, "n_routed_experts", allow_none=True) or 0
    eos = raw.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    quant = raw.get("quantization_config")
    fp8_block = None
    if quant:
        if quant.get("quant_method") != "fp8":
            raise ConfigError(f"quantization_config.quant_method: unsupported {quant.get('quant_method')!r}")
        fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
    cfg = ModelConfig(
        model_type=mt,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=_require(raw, "hidden_size"),
        intermediate_size=_require(raw, "intermediate_size"),
        num_hidden_layers=_require(raw, "num_hidden_layers"),
        num_attention_heads=_require(raw, "num_attention_heads"),
        kv_lora_rank=_require(raw, "kv_lora_rank"),
        q_lora_rank=_require(raw, "q_lora_rank", allow_none=True) if "q_lora_rank" in raw else None,
        qk_nope_head_dim=_require(raw, "qk_nope_head_dim"),
        qk_rope_head_dim=_require(raw, "qk_rope_head_dim"),
        v_head_dim=_require(raw, "v_head_dim"),
        moe_intermediate_size=_require(raw, "moe_intermediate_size"),
        n_routed_experts=n_routed,
        n_shared_experts=raw.get("n_shared_experts") or 0,
        num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        moe_layer_freq=raw.get("moe_layer_freq") or 1,
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        topk_method=raw.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope=_rope_from(raw),
        rope_interleave=bool(raw.get("rope_interleave", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        fp8_block=fp8_block,
    )
    validate(cfg)
    return cfg


def validate(c: ModelConfig) -> None:
    def bad(name, why):
        raise ConfigError(f"config.json: {name} {why}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim"):
        if getattr(c, name) <= 0:
            bad(name, f"must be positive, got {getattr(c, name)}")
    if c.qk_nope_head_dim < 0:
        bad("qk_nope_head_dim", "must be >= 0")
    if c.qk_rope_head_dim % 2:
        bad("qk_rope_head_dim", f"must be even for rotary pairs, got {c.qk_rope_head_dim}")
    if c.n_routed_experts:
        if not 0 < c.num_experts_per_tok <= c.n_routed_experts:
            bad("num_experts_per_tok",
                f"must be in 1..n_routed_experts={c.n_routed_experts}, got {c.num_experts_per_tok}")
        if c.n_routed_experts % c.n_group:
            bad("n_group", f"must divide n_routed_experts={c.n_routed_experts}, got {c.n_group}")
        if not 0 < c.topk_group <= c.n_group:
            bad("topk_group", f"must be in 1..n_group={c.n_group}, got {c.topk_group}")
        per_group = c.n_routed_experts // c.n_group
        if c.topk_group * per_group < c.num_experts_per_tok:
            bad("topk_group", f"{c.topk_group} groups of {per_group} experts cannot supply "
                              f"num_experts_per_tok={c.num_experts_per_tok}")
        if c.model_type == "deepseek_v3" and c.n_group > 1 and per_group < 2:
            bad("n_group", "V3 group scoring sums each group's top-2 experts: need >= 2 experts per group")
        methods = ("noaux_tc",) if c.model_type == "deepseek_v3" else ("greedy", "group_limited_greedy")
        if c.topk_method not in methods:
            bad("topk_method", f"{c.topk_method!r} is not supported for {c.model_type} (expected {methods})")
    if c.first_k_dense_replace > c.num_hidden_layers:
        bad("first_k_dense_replace",
            f"{c.first_k_dense_replace} exceeds num_hidden_layers={c.num_hidden_layers}")


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}: not a Hugging Face checkpoint folder")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw)
