"""Names and shapes of the tensors in a Hugging Face DeepSeek checkpoint (per-expert naming).

One source of truth for the loader (what to expect) and the checkpoint maker (what to write).
"""
import re

from .config import ModelConfig

EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
                       r"(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")

# Tensors that stay in high precision in DeepSeek's FP8 checkpoints.
_NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.")


def is_fp8_quantized(name: str) -> bool:
    return name.endswith(".weight") and not any(k in name for k in _NOT_QUANTIZED)


def _mlp(prefix: str, hidden: int, inter: int) -> dict:
    return {f"{prefix}.gate_proj.weight": (inter, hidden), f"{prefix}.up_proj.weight": (inter, hidden),
            f"{prefix}.down_proj.weight": (hidden, inter)}


def layer_shapes(cfg: ModelConfig, i: int) -> dict:
    """Tensors of decoder layer i, name -> shape."""
    p, h, H = f"model.layers.{i}", cfg.hidden_size, cfg.num_attention_heads
    a = f"{p}.self_attn"
    out = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
    if cfg.q_lora_rank is None:
        out[f"{a}.q_proj.weight"] = (H * cfg.qk_head_dim, h)
    else:
        out[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        out[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        out[f"{a}.q_b_proj.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
    out[f"{a}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    out[f"{a}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    out[f"{a}.kv_b_proj.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    out[f"{a}.o_proj.weight"] = (h, H * cfg.v_head_dim)
    if cfg.attention_bias:
        out[f"{a}.kv_a_proj_with_mqa.bias"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim,)
        out[f"{a}.o_proj.bias"] = (h,)
        if cfg.q_lora_rank is not None:
            out[f"{a}.q_a_proj.bias"] = (cfg.q_lora_rank,)
    if not cfg.is_moe_layer(i):
        out.update(_mlp(f"{p}.mlp", h, cfg.intermediate_size))
        return out
    out[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
    if cfg.model_type == "deepseek_v3":
        out[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
    if cfg.n_shared_experts:
        out.update(_mlp(f"{p}.mlp.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts))
    for e in range(cfg.n_routed_experts):
        out.update(_mlp(f"{p}.mlp.experts.{e}", h, cfg.moe_intermediate_size))
    return out


def checkpoint_shapes(cfg: ModelConfig):
    """Yield (name, shape) for the whole checkpoint in file order, layer by layer."""
    yield "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        yield from layer_shapes(cfg, i).items()
    yield "model.norm.weight", (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, cfg.hidden_size)
