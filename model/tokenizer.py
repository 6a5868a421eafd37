"""Tokenizers, chosen by what the checkpoint folder holds.

- `tokenizer.json`: Hugging Face `tokenizers` format (byte-level BPE; what DeepSeek-V3 ships).
- `tokenizer.model`: sentencepiece.
A folder with neither has no tokenizer: prompts must then be token ids.
"""
import functools
import json
import os


class Tokenizer:
    def __init__(self, encode, decode, vocab_size: int, bos_token_id=None, eos_token_id=None):
        self._encode, self._decode = encode, decode
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode(ids if type(ids) is list else list(ids))   # no copy per streamed token


def _special_ids(model_dir: str, token_to_id):
    """bos/eos from tokenizer_config.json when present (as DeepSeek's checkpoints have them)."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        tc = json.load(f)

    def tok(key):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return token_to_id(v) if v is not None else None

    return tok("bos_token"), tok("eos_token")


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    hf = os.path.join(model_dir, "tokenizer.json")
    sp = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(hf):
        from tokenizers import Tokenizer as HFTokenizer
        t = HFTokenizer.from_file(hf)
        bos, eos = _special_ids(model_dir, t.token_to_id)
        return Tokenizer(lambda s: t.encode(s).ids,
                         functools.partial(t.decode, skip_special_tokens=True),
                         t.get_vocab_size(), bos, eos)
    if os.path.isfile(sp):
        import sentencepiece as spm
        t = spm.SentencePieceProcessor(model_file=sp)
        bos, eos = t.bos_id(), t.eos_id()
        return Tokenizer(t.encode, t.decode, t.get_piece_size(),
                         bos if bos >= 0 else None, eos if eos >= 0 else None)
    return None
