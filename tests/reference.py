"""Shared test fixtures: tiny transformers reference checkpoints and a cache-backed forward."""
import torch

from model.deepseek import AttentionMetadata

TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
    first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=24, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0,
)

TINY_V2 = dict(
    model_type="deepseek_v2", vocab_size=256, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
    kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
    max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
)


def make_hf_checkpoint(path, overrides=None, base=TINY_V3, seed=0, std=0.2):
    """Build a random transformers DeepSeek model, save it to `path`, return the HF model (fp32)."""
    import transformers
    raw = dict(base)
    raw.update(overrides or {})
    mt = raw.pop("model_type")
    cls_cfg, cls_model = ((transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)
                          if mt == "deepseek_v3" else
                          (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM))
    cfg = cls_cfg(**raw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))  # zero by default: randomize so it matters
    model.save_pretrained(path)
    return model


def dense_meta(seq_lens, prefix_lens=None, block_size=16, mla_path="auto", device="cpu"):
    """Metadata for sequences laid out contiguously in the cache: seq b owns blocks
    [b*nb, (b+1)*nb). New tokens are positions prefix_lens[b] .. seq_lens[b]-1."""
    prefix_lens = prefix_lens or [0] * len(seq_lens)
    nb = -(-max(seq_lens) // block_size)
    tables = torch.arange(len(seq_lens) * nb, dtype=torch.int32).view(len(seq_lens), nb)
    pos, slots, qsl = [], [], [0]
    for b, (s, p) in enumerate(zip(seq_lens, prefix_lens)):
        for t in range(p, s):
            pos.append(t)
            slots.append(int(tables[b, t // block_size]) * block_size + t % block_size)
        qsl.append(qsl[-1] + s - p)
    return AttentionMetadata(positions=torch.tensor(pos, device=device),
                             slot_mapping=torch.tensor(slots, device=device),
                             block_tables=tables.to(device), seq_lens=list(seq_lens), query_start_loc=qsl,
                             mla_path=mla_path), len(seq_lens) * nb


def new_caches(model, num_blocks, block_size=16, dtype=torch.float32):
    cfg = model.cfg
    return [torch.zeros(num_blocks, block_size, cfg.kv_cache_dim, dtype=dtype)
            for _ in range(cfg.num_hidden_layers)]


def forward_logits(model, seqs, mla_path="auto"):
    """Logits for every token of each sequence (list of id lists), in one flattened batch."""
    meta, nblocks = dense_meta([len(s) for s in seqs], mla_path=mla_path)
    ids = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        h = model(ids, meta, new_caches(model, nblocks))
        return model.compute_logits(h)
