"""Tokenizers, chosen by what the checkpoint folder holds.

- `tokenizer.json`: Hugging Face `tokenizers` format (byte-level BPE; what DeepSeek-V3 ships).
- `tokenizer.model`: sentencepiece.
A folder with neither has no tokenizer: prompts must then be token ids.
"""
import codecs
import functools
import json
import os
import random


class Tokenizer:
    """`token_bytes[id]`: the bytes a token decodes to, where decoding is exactly the UTF-8 of the
    concatenated bytes (byte-level BPE; checked at load against the real decoder), else None."""

    def __init__(self, encode, decode, vocab_size: int, bos_token_id=None, eos_token_id=None,
                 token_bytes: list[bytes] | None = None):
        self._encode, self._decode = encode, decode
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.token_bytes = token_bytes
        self._token_texts = None

    @property
    def token_texts(self) -> list[str | None] | None:
        """Per id, the text of `token_bytes[id]` where those bytes are whole characters (else None):
        built once, shared by every request's detokenizer."""
        if self._token_texts is None and self.token_bytes is not None:
            self._token_texts = whole_texts(self.token_bytes)
        return self._token_texts

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode(ids if type(ids) is list else list(ids))   # no copy per streamed token


def whole_texts(token_bytes: list[bytes]) -> list[str | None]:
    """Each token's text where its bytes decode alone to whole characters, else None."""
    out = []
    for b in token_bytes:
        text, used = codecs.utf_8_decode(b, "replace", False)
        out.append(text if used == len(b) else None)
    return out


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


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character: bytes that are printable Latin-1
    stand for themselves, the other 68 take the code points from 256 up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = sorted(set(range(256)) - set(kept))
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def _token_bytes(t, spec: dict) -> list[bytes] | None:
    """Each id's bytes for a plain byte-level BPE tokenizer.json (special tokens: none, as decode
    skips them), or None for any other decoder or where a sample of decodes disagrees."""
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("model", {}).get("type") != "BPE":
        return None
    alphabet, n = _byte_alphabet(), t.get_vocab_size(with_added_tokens=True)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    table = [b""] * n
    for piece, i in t.get_vocab(with_added_tokens=True).items():
        if i in added:
            table[i] = b"" if added[i].get("special") else piece.encode()
        elif all(c in alphabet for c in piece):
            table[i] = bytes(alphabet[c] for c in piece)
        else:
            return None
    rng = random.Random(0)
    samples = [[i] for i in [*range(min(n, 1024)), *added]]
    samples += [[rng.randrange(n) for _ in range(12)] for _ in range(256)]
    for ids in samples:
        text = b"".join(table[i] for i in ids).decode("utf-8", "replace")
        if text != t.decode(ids, skip_special_tokens=True):
            return None
    return table


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    hf = os.path.join(model_dir, "tokenizer.json")
    sp = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(hf):
        from tokenizers import Tokenizer as HFTokenizer
        t = HFTokenizer.from_file(hf)
        bos, eos = _special_ids(model_dir, t.token_to_id)
        with open(hf) as f:
            spec = json.load(f)
        return Tokenizer(lambda s: t.encode(s).ids,
                         functools.partial(t.decode, skip_special_tokens=True),
                         t.get_vocab_size(), bos, eos, _token_bytes(t, spec))
    if os.path.isfile(sp):
        import sentencepiece as spm
        t = spm.SentencePieceProcessor(model_file=sp)
        bos, eos = t.bos_id(), t.eos_id()
        return Tokenizer(t.encode, t.decode, t.get_piece_size(),
                         bos if bos >= 0 else None, eos if eos >= 0 else None)
    return None
