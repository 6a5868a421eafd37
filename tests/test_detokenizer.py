"""Incremental detokenization, by a sliding decode window or by the byte-level table: the streamed
text equals decoding the whole sequence at once (up to an incomplete trailing character)."""
import json
import random

import pytest

from engine.detokenizer import ByteDetokenizer, IncrementalDetokenizer, detokenizer
from launch.make_checkpoint import write_tokenizer
from model.tokenizer import load_tokenizer


@pytest.mark.parametrize("kind", ["window", "bytes"])
def test_incremental_text_matches_full_decode(tmp_path, kind):
    write_tokenizer(str(tmp_path), "bpe", 512)
    tok = load_tokenizer(str(tmp_path))
    assert tok.token_bytes is not None   # byte-level BPE: the table lookup is exact
    rng = random.Random(0)
    for _ in range(50):
        # special ids 0/1 too, and ids past the tokenizer's 512 (a model's padded vocabulary)
        ids = [rng.randrange(0, 530) for _ in range(rng.randint(1, 40))]
        d = IncrementalDetokenizer(tok) if kind == "window" else ByteDetokenizer(tok.token_bytes)
        deltas = "".join(d.add(t) for t in ids)
        full = tok.decode(ids)
        assert deltas == d.text
        assert full.startswith(d.text) and len(full) - len(d.text) <= 3
        if not full.endswith("\ufffd"):
            assert d.text == full


@pytest.mark.parametrize("kind", ["window", "bytes"])
def test_stop_string_found_across_token_boundaries(tmp_path, kind):
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
        d = IncrementalDetokenizer(tok) if kind == "window" else ByteDetokenizer(tok.token_bytes)
        found = None
        for t in ids:
            delta = d.add(t)
            reason, text = check_stop(t, d.text, len(delta), frozenset(), params.stop)
            if reason is not None:
                found = text
                break
        assert found == full[:full.index(stop)]


def test_byte_table_only_for_plain_byte_level_decoders(tmp_path):
    """Another decoder (here byte-level with a Strip step after it) could change the text: the
    tokenizer then has no byte table and requests get the window detokenizer."""
    write_tokenizer(str(tmp_path), "bpe", 512)
    path = tmp_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    spec["decoder"] = {"type": "Sequence", "decoders": [spec["decoder"], strip]}
    path.write_text(json.dumps(spec))
    tok = load_tokenizer(str(tmp_path))
    assert tok.token_bytes is None
    assert isinstance(detokenizer(tok), IncrementalDetokenizer)
    assert detokenizer(None) is None
