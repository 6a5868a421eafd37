"""The network against transformers' DeepSeek implementations (fp32, CPU)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from model.config import ConfigError, load_config, parse_config
from model.loader import load_model
from reference import TINY_V2, TINY_V3, dense_meta, forward_logits, make_hf_checkpoint, new_caches

SEQS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41, 42], [7]]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.8,
        "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}


def hf_logits(hf, seqs):
    with torch.no_grad():
        return torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])


CASES = {
    "v3": (TINY_V3, {}),
    "v3-yarn": (TINY_V3, {"rope_parameters": YARN}),
    "v3-odd-dims": (TINY_V3, {"qk_nope_head_dim": 12, "qk_rope_head_dim": 6, "v_head_dim": 10,
                              "kv_lora_rank": 20, "q_lora_rank": 28, "num_attention_heads": 3,
                              "num_key_value_heads": 3}),
    "v3-no-q-lora-tied": (TINY_V3, {"q_lora_rank": None, "tie_word_embeddings": True}),
    "v3-no-interleave-no-groups": (TINY_V3, {"rope_interleave": False, "n_group": 1, "topk_group": 1,
                                            "norm_topk_prob": False}),
    "v2-greedy": (TINY_V2, {}),
    "v2-group-limited-yarn": (TINY_V2, {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                        "q_lora_rank": 24, "rope_parameters": YARN}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    base, over = CASES[case]
    hf = make_hf_checkpoint(tmp_path, over, base=base)
    ours = forward_logits(load_model(str(tmp_path)), SEQS)
    ref = hf_logits(hf, SEQS)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


def test_absorbed_and_expanded_paths_agree(tmp_path):
    make_hf_checkpoint(tmp_path, {"rope_parameters": YARN})
    model = load_model(str(tmp_path))
    lens = [len(s) for s in SEQS]
    outs = {}
    for path in ("expanded", "absorbed"):
        # prefill everything but the last 2 tokens, then both paths compute the last 2 against the cache
        meta, nb = dense_meta([l - 2 if l > 2 else 0 for l in lens])
        caches = new_caches(model, nb * 2)
        ids = torch.tensor([t for s in SEQS for t in s[:-2]])
        with torch.no_grad():
            model(ids, meta, caches)
            meta2, _ = dense_meta(lens, prefix_lens=[max(l - 2, 0) for l in lens], mla_path=path)
            tail = torch.tensor([t for s in SEQS for t in s[-2:]])
            outs[path] = model.compute_logits(model(tail, meta2, caches))
    full = forward_logits(model, SEQS)
    ends = [i for b, s in enumerate(SEQS) for i in range(sum(lens[:b]) + len(s) - min(2, len(s)), sum(lens[:b + 1]))]
    assert (outs["absorbed"] - outs["expanded"]).abs().max().item() < 1e-4
    assert (outs["expanded"] - full[ends]).abs().max().item() < 1e-4


def test_old_rope_scaling_form_equals_rope_parameters():
    new = dict(TINY_V3, rope_parameters=YARN)
    old = dict(TINY_V3, rope_theta=YARN["rope_theta"],
               rope_scaling={("type" if k == "rope_type" else k): v for k, v in YARN.items() if k != "rope_theta"})
    a, b = parse_config(new), parse_config(old)
    assert a.rope == b.rope and a.rope.kind == "yarn"
    # mscale_all_dim enters the softmax scale squared
    m = 0.1 * 0.7 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert abs(a.softmax_scale - (a.qk_head_dim ** -0.5) * m * m) < 1e-9


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        parse_config(dict(TINY_V3, model_type="llama"))
    with pytest.raises(ConfigError, match="n_group"):
        parse_config(dict(TINY_V3, n_group=3))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        parse_config(dict(TINY_V3, num_experts_per_tok=9))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        parse_config({k: v for k, v in TINY_V3.items() if k != "kv_lora_rank"})
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        parse_config(dict(TINY_V3, qk_rope_head_dim=7))
    with pytest.raises(ConfigError, match="topk_method"):
        parse_config(dict(TINY_V2, topk_method="noaux_tc"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(str(tmp_path))
