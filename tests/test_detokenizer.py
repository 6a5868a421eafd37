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


def test_stop_string_found_across_token_boundaries(tmp_path):
    """check_stop searches only the tail the latest delta could complete, yet finds every stop string
    at its first occurrence in the full text, however it straddles tokens."""
    from engine.detokenizer import check_stop
    from engine.sampling import SamplingParams
    write_tokenizer(str(tmp_path), "bpe", 512)
    tok = load_tokenizer(str(tmp_path))
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(2, 512) for _ in range(30)]
        full = tok.decode(ids).rstrip("\ufffd")
        if len(full) < 8:
            continue
        i = rng.randrange(1, len(full) - 4)
        stop = full[i:i + rng.randint(2, 4)]
        params = SamplingParams(max_tokens=100, stop=[stop], ignore_eos=True)
        d, found = IncrementalDetokenizer(tok), None
        for n, t in enumerate(ids, 1):
            delta = d.add(t)
            reason, text = check_stop(t, d.text, len(delta), params, set(), n)
            if reason is not None:
                found = text
                break
        assert found == full[:full.index(stop)]
