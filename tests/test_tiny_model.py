"""The tokenizer's special tokens and chat template, and the trained tiny DeepSeek-V3."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch

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


# ---------------------------------------------------------------------------------------------
# launch/train_tiny.py: the same command twice gives the same bytes

def test_short_training_run_is_bit_for_bit(tmp_path):
    """A shortened run of the command that made the committed checkpoint, run twice, writes identical
    files; its tokenizer (trained on the same corpus) is the committed one byte for byte."""
    from launch import train_tiny
    args = ["--steps", "3", "--batch", "2", "--seq-len", "32", "--eval-windows", "2", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = train_tiny.train(train_tiny.parse_args([str(a)] + args))
    res_b = train_tiny.train(train_tiny.parse_args([str(b)] + args))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert res_a == res_b
    for n in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / n).read_bytes() == (TRAINED / n).read_bytes(), n
    # the trained weights moved: they differ from a fresh model of the same seed
    from safetensors.torch import load_file
    trained = load_file(str(a / "model.safetensors"))
    assert trained["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert trained["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert trained["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0   # balanced


# ---------------------------------------------------------------------------------------------
# the committed trained checkpoint

TRAINED = pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-v3-trained"
PROMPTS = ["The assert statement", "The import statement", "A function definition", "The while loop",
           "Exceptions", "A class definition creates"]


@pytest.fixture(scope="module")
def trained():
    assert (TRAINED / "config.json").is_file(), f"committed checkpoint missing at {TRAINED}"
    tok = load_tokenizer(str(TRAINED))
    return str(TRAINED), tok, [tok.encode(p) for p in PROMPTS]


def hf_greedy(path, prompt_ids, n, dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompt_ids]


def test_trained_greedy_matches_transformers_fp32(trained):
    """80 greedy tokens per prompt (past EOS: the model starts another topic), token for token."""
    from engine import LLM, SamplingParams
    path, tok, prompt_ids = trained
    prompt_ids = prompt_ids[::2] + prompt_ids[1:2]   # 4 prompts: transformers' generate is the slow part
    ref = hf_greedy(path, prompt_ids, 80, torch.float32)
    outs = LLM(path, kv_block_size=16).generate(
        prompt_ids, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    for p, o, r in zip(prompt_ids, outs, ref):
        assert o.token_ids == r, (p, tok.decode(o.token_ids), tok.decode(r))


# Fails today: one of the 4 prompts parts from transformers within 64 tokens, on main and also with
# issue 14's bf16 fixes (rope/router bias in fp32, commit cb0581b) applied: bf16 rounding differs.
@pytest.mark.xfail(reason="engine bf16 greedy parts from transformers' bf16 on one prompt (see comment)",
                   strict=False)
def test_trained_greedy_matches_transformers_bf16(trained):
    from engine import LLM, SamplingParams
    path, tok, prompt_ids = trained
    prompt_ids = prompt_ids[:4]
    ref = hf_greedy(path, prompt_ids, 64, torch.bfloat16)
    outs = LLM(path, dtype="bfloat16", kv_block_size=16).generate(
        prompt_ids, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for p, o, r in zip(prompt_ids, outs, ref):
        assert o.token_ids == r, (p, tok.decode(o.token_ids), tok.decode(r))


def test_trained_model_speaks_the_corpus(trained):
    """Greedy completions are made of words of the Python reference (a random model's are not) and
    the model is sure of them: the distributions are peaked, not near-tied."""
    from engine import LLM, SamplingParams
    path = trained[0]
    text = (TRAINED.parent.parent / "launch" / "corpus_pydoc_train.txt").read_text(encoding="utf-8")
    vocab = set(re.findall(r"[A-Za-z]{3,}", text))
    outs = LLM(path).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48))
    words = [w for o in outs for w in re.findall(r"[A-Za-z]{3,}", o.text)]
    assert len(words) >= 5 * len(PROMPTS)
    known = sum(w in vocab for w in words) / len(words)
    assert known >= 0.9, (known, [o.text for o in outs])


def test_trained_seeded_sampling_is_reproducible(trained):
    from engine import LLM, SamplingParams
    llm = LLM(trained[0])
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=s, ignore_eos=True)
              for s in range(4)]
    first = [o.token_ids for o in llm.generate(PROMPTS[:4], params)]
    # again, in another batch composition: the seeded requests draw from their own generators
    again = [o.token_ids for o in llm.generate(PROMPTS[:4] + PROMPTS[4:], params + params[:2])][:4]
    assert first == again
    greedy = [o.token_ids for o in llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=32,
                                                                            ignore_eos=True))]
    assert first != greedy                      # sampling really sampled
    other = [o.token_ids for o in llm.generate(PROMPTS[:1] * 4, [SamplingParams(
        temperature=0.8, top_p=0.95, max_tokens=32, seed=s, ignore_eos=True) for s in range(4)])]
    assert len({tuple(t) for t in other}) > 1  # different seeds, different texts


def test_trained_stop_strings_on_real_words(trained):
    """A word the model writes stops the text right before it; text and tokens stay consistent."""
    from engine import LLM, SamplingParams
    llm = LLM(trained[0])
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", full.text)]
    assert len(words) >= 3, full.text
    for m in words[1:3]:   # the 2nd and 3rd real words of the greedy text
        word = m.group()
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                                                      stop=[word, "zzzz-never"]))[0]
        assert out.finish_reason == "stop"
        assert out.text == full.text[:full.text.index(word)], word
        assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_demo_on_two_ranks_matches_transformers(trained):
    """What `make run` does: the demo under torchrun (DP=EP=2), greedy text checked against
    transformers' by the demo itself."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(port), "-m", "launch.demo", "--check", "--max-tokens", "64"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=TRAINED.parent.parent,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 rank(s)" in p.stdout and "DIFFERS" not in p.stdout, p.stdout
    n = len(re.findall(r"^--- ", p.stdout, flags=re.MULTILINE))
    assert n == 5 and f"greedy text equal to transformers' on {n} of {n} prompts" in p.stdout, p.stdout
