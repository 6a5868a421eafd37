"""Incremental detokenization: the streamed text equals decoding the whole sequence at once (up to
an incomplete trailing character), whatever the window's position."""
import random

from engine.detokenizer import IncrementalDetokenizer
from launch.make_checkpoint import write_tokenizer
from model.tokenizer import load_tokenizer


def test_incremental_text_matches_full_decode(tmp_path):
    write_tokenizer(str(tmp_path), "bpe", 512)
    tok = load_tokenizer(str(tmp_path))
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(2, 512) for _ in range(rng.randint(1, 40))]
        d = IncrementalDetokenizer(tok)
        deltas = "".join(d.add(t) for t in ids)
        full = tok.decode(ids)
        assert deltas == d.text
        assert full.startswith(d.text) and len(full) - len(d.text) <= 3
        if not full.endswith("\ufffd"):
            assert d.text == full
