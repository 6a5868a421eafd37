"""The tokenizer's special tokens and chat template, and the trained tiny DeepSeek-V3."""
import json

import pytest

from launch.make_checkpoint import ASSISTANT, BOS, EOS, USER, make_checkpoint
from model.tokenizer import load_tokenizer


def test_chat_template_special_tokens(tmp_path):
    """DeepSeek's special tokens have ids 0..3, are parsed from text, and transformers renders
    the chat template the way DeepSeek-V3 lays out a conversation."""
    from transformers import AutoTokenizer
    make_checkpoint(str(tmp_path), "tiny-v3")
    tok = load_tokenizer(str(tmp_path))
    assert [tok.encode(t) for t in (BOS, EOS, USER, ASSISTANT)] == [[0], [1], [2], [3]]
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(tok.encode(BOS + "Hi" + EOS)) == "Hi"      # special tokens are skipped
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is x?"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}{USER}Hi{ASSISTANT}Hello{EOS}{USER}What is x?{ASSISTANT}"
    assert hf.apply_chat_template(msgs[:1], tokenize=False) == f"{BOS}{USER}Hi"
    assert hf(text).input_ids == tok.encode(text)    # no BOS added twice: it is in the template
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (cfg["bos_token"], cfg["eos_token"]) == (BOS, EOS)


def test_tokenizer_trainer_arguments(tmp_path):
    from launch.make_checkpoint import write_tokenizer
    corpus = tmp_path / "c.txt"
    corpus.write_text("the assert statement and the import statement\n" * 50)
    write_tokenizer(str(tmp_path / "t"), "bpe", 300, corpus=str(corpus))
    tok = load_tokenizer(str(tmp_path / "t"))
    assert tok.vocab_size <= 300 and len(tok.encode("the assert statement")) <= 3
    with pytest.raises(FileNotFoundError, match="corpus"):
        write_tokenizer(str(tmp_path / "u"), "bpe", 300, corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer(str(tmp_path / "u"), "bpe", 100, corpus=str(corpus))
