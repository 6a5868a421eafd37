"""Checkpoint loading: FP8, shards, MTP layers, expert subsets, tokenizers, and clear errors."""
import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.fp8 import dequant_block_fp8, quant_block_fp8
from launch.make_checkpoint import make_checkpoint, write_checkpoint
from model.layout import is_fp8_quantized
from model.loader import CheckpointError, checkpoint_files, load_model
from model.tokenizer import load_tokenizer
from reference import forward_logits, make_hf_checkpoint

SEQS = [[5, 9, 2, 77, 31, 8, 8, 100, 4, 3, 64], [200, 1, 2]]
ODD = {"qk_nope_head_dim": 12, "qk_rope_head_dim": 6, "v_head_dim": 10, "kv_lora_rank": 20,
       "q_lora_rank": 28, "num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 40,
       "intermediate_size": 52, "moe_intermediate_size": 20}


def _tensors(src):
    files = checkpoint_files(src)
    def get(name):
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name)
    return get


def _raw(src):
    with open(os.path.join(src, "config.json")) as f:
        return json.load(f)


def test_fp8_checkpoint_matches_reference_from_dequantized_weights(tmp_path):
    src, q8, deq = (str(tmp_path / n) for n in ("src", "fp8", "deq"))
    make_hf_checkpoint(src, ODD)
    get = _tensors(src)
    # 16x16 blocks on odd dims: every matrix has partial edge blocks
    write_checkpoint(q8, _raw(src), fp8=True, fp8_block=16, tensors=get)

    def roundtrip(name):
        t = get(name)
        return dequant_block_fp8(*quant_block_fp8(t, 16), 16) if is_fp8_quantized(name) else t
    write_checkpoint(deq, _raw(src), tensors=roundtrip)
    with safe_open(checkpoint_files(q8)["model.layers.1.self_attn.kv_b_proj.weight"], "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(deq, attn_implementation="eager")
    ref_model = ref_model.float().eval()
    with torch.no_grad():
        ref = torch.cat([ref_model(torch.tensor([s])).logits[0] for s in SEQS])
    ours = forward_logits(load_model(q8), SEQS)
    assert (ours - ref).abs().max().item() < 1e-4
    # and quantization really changed the weights (the test would pass vacuously otherwise)
    plain = forward_logits(load_model(src), SEQS)
    assert (plain - ref).abs().max().item() > 1e-3


def test_sharded_checkpoint_with_mtp_layer_and_transformers_loads_ours(tmp_path):
    src, out = str(tmp_path / "ck"), str(tmp_path / "sharded")
    make_checkpoint(src, "tiny-v3", seed=3)
    raw = _raw(src)
    # re-shard into small files and add an MTP layer (index num_hidden_layers) that must be skipped
    write_checkpoint(out, raw, tensors=_tensors(src), shard_bytes=100_000)
    mtp = {f"model.layers.{raw['num_hidden_layers']}.eh_proj.weight": torch.zeros(4, 4)}
    save_file(mtp, os.path.join(out, "mtp.safetensors"))
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(idx["weight_map"].values())) > 3
    idx["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    json.dump(idx, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    ours = load_model(out)
    del idx["weight_map"][next(iter(mtp))]  # transformers' own loader: hand it the plain checkpoint
    json.dump(idx, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in SEQS])
    assert (forward_logits(ours, SEQS) - ref).abs().max().item() < 1e-4


def test_experts_to_load_subset(tmp_path):
    make_hf_checkpoint(tmp_path)
    full = load_model(str(tmp_path))
    part = load_model(str(tmp_path), local_experts=[1, 5])
    e_full, e_part = full.model.layers[1].mlp.experts, part.model.layers[1].mlp.experts
    assert e_part.w13.shape[0] == 2
    assert torch.equal(e_part.w13[1], e_full.w13[5]) and torch.equal(e_part.w2[0], e_full.w2[1])
    assert e_part.expert_map.tolist() == [-1, 0, -1, -1, -1, 1, -1, -1]


def test_loader_errors_name_the_tensor(tmp_path):
    src = str(tmp_path / "src")
    make_hf_checkpoint(src)
    get, raw = _tensors(src), _raw(src)
    bad = str(tmp_path / "bad")
    write_checkpoint(bad, raw, tensors=lambda n: get(n)[:-1] if n.endswith("kv_b_proj.weight") else get(n))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight.*\(159, 32\).*\(160, 32\)"):
        load_model(bad)
    files = checkpoint_files(src)
    with safe_open(files["lm_head.weight"], "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if "o_proj" not in k}
    miss = tmp_path / "miss"
    miss.mkdir()
    save_file(kept, str(miss / "model.safetensors"))
    (miss / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing .*o_proj"):
        load_model(str(miss))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(empty))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_round_trip(tmp_path, kind):
    make_checkpoint(str(tmp_path), "tiny-v3", tokenizer=kind)
    tok = load_tokenizer(str(tmp_path))
    for text in ["Hello world", "  spaces\tand\nnewlines  ", "ünïcödé — 日本語 🙂", "3.14159 x 100", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 1
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")  # merges were learned


def test_no_tokenizer_is_none(tmp_path):
    make_checkpoint(str(tmp_path), "tiny-v3", tokenizer="none")
    assert load_tokenizer(str(tmp_path)) is None


def test_fp8_resident_experts_match_dequantized(tmp_path):
    """keep_fp8 keeps 128x128-block experts in FP8 with their scales; the torch path dequantizes
    on the fly and gives the logits of the dequantized load."""
    src, q8 = str(tmp_path / "src"), str(tmp_path / "fp8")
    make_hf_checkpoint(src, {"moe_intermediate_size": 128, "hidden_size": 160})
    write_checkpoint(q8, _raw(src), fp8=True, fp8_block=128, tensors=_tensors(src))
    kept, deq = load_model(q8, keep_fp8=True), load_model(q8)
    ex = kept.model.layers[1].mlp.experts
    assert ex.w13.dtype == torch.float8_e4m3fn and ex.w13_scale.shape == (8, 2, 2)
    assert ex.w2.dtype == torch.float8_e4m3fn and ex.w2_scale.shape == (8, 2, 1)
    assert (forward_logits(kept, SEQS) - forward_logits(deq, SEQS)).abs().max().item() < 1e-4
