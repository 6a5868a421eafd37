"""Incremental detokenization and stop conditions for one request."""
import codecs

from model.tokenizer import whole_texts


def detokenizer(tokenizer):
    """The cheapest exact detokenizer the tokenizer allows (None without a tokenizer)."""
    if tokenizer is None:
        return None
    if tokenizer.token_bytes is not None:
        return ByteDetokenizer(tokenizer.token_bytes, tokenizer.token_texts)
    return IncrementalDetokenizer(tokenizer)


class ByteDetokenizer:
    """Byte-level BPE: a token is fixed bytes, so the text is the UTF-8 of their concatenation,
    decoded as it grows (a character split across tokens comes out once complete). One table
    lookup per token instead of re-decoding a window: the per-token host cost at a large batch.
    `texts[id]`: the token's text where its bytes are whole characters (None where not): with no
    partial character pending, such a token needs no decoding at all."""
    __slots__ = ("_bytes", "_texts", "_pending", "text")

    def __init__(self, token_bytes: list[bytes], texts: list[str | None] | None = None):
        self._bytes = token_bytes
        self._texts = texts if texts is not None else whole_texts(token_bytes)
        self._pending = b""   # the start of a character whose last bytes are still to come
        self.text = ""

    def add(self, token_id: int) -> str:
        table = self._bytes   # ids past the tokenizer's (a model's padded vocabulary) decode to nothing
        if token_id >= len(table):
            return ""
        if not self._pending:
            delta = self._texts[token_id]
            if delta is not None:
                self.text += delta
                return delta
        data = self._pending + table[token_id]
        # the codec's incremental step itself (what codecs' incremental decoder wraps in a method)
        delta, used = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[used:]
        if delta:
            self.text += delta
        return delta


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level tokens can split a UTF-8 character: text is emitted only once the decoded tail no
    longer ends in U+FFFD. A window of a few earlier tokens is decoded with the new ones so that
    merges across the boundary (leading spaces, multi-byte characters) come out right."""

    WINDOW = 6
    __slots__ = ("tok", "_decode", "ids", "text", "_prefix", "_read", "_before")

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._decode = tokenizer.decode   # bound once: add() runs per token of every request
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0   # ids[_prefix:_read] were already emitted
        self._read = 0
        self._before: str | None = ""   # decode(ids[_prefix:_read]), None: to compute

    def add(self, token_id: int) -> str:
        ids, prefix = self.ids, self._prefix
        ids.append(token_id)
        before = self._before
        if before is None:
            before = self._decode(ids[prefix:self._read])
        after = self._decode(ids[prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            self._before = before
            return ""
        delta = after[len(before):]
        self.text += delta
        read = self._read = len(ids)
        # The window slides only once it is twice its size: until then the next "before" is this
        # "after", so most tokens cost one decode instead of two (per-step host time).
        if read - prefix > 2 * self.WINDOW:
            self._prefix, self._before = read - self.WINDOW, None
        else:
            self._before = after
        return delta


def check_stop(token_id: int, text: str, delta_len: int, stop_ids, stops: list[str]):
    """-> ("stop" or None, text trimmed at a stop string). `stop_ids`: the token ids that end the
    request (EOS unless ignored, and its stop_token_ids). A stop string is searched only in the
    region the latest delta could complete, so the check stays linear in the output length.
    (max_tokens and the model length are the batch scheduler's to enforce: "length".)"""
    if token_id in stop_ids:
        return "stop", text
    for s in stops:
        start = max(0, len(text) - delta_len - len(s) + 1)
        i = text.find(s, start)
        if i >= 0:
            return "stop", text[:i]
    return None, text
