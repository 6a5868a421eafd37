"""Prefix hashing of KV blocks, the one definition every cache lookup and estimate uses.

A full block's hash chains over the whole prefix, hash((parent_hash, tuple(tokens))), so equal
hashes mean equal prefixes, not just equal blocks. Python hashes tuples of ints the same way in
every process, so ranks and the coordinator agree.
"""
ROOT_HASH = -1   # parent of a sequence's first block (an int: hash(None) varies between processes)


def hashed_blocks(tokens: list[int], block_size: int, end: int | None = None, start: int = 0,
                  parent: int = ROOT_HASH):
    """Yield (token tuple, hash) of full blocks start..end-1 (`parent`: the hash of block start-1).
    Default end: the blocks before the last token, which is always computed to give logits."""
    end = (len(tokens) - 1) // block_size if end is None else end
    for i in range(start, end):
        chunk = tuple(tokens[i * block_size:(i + 1) * block_size])
        parent = hash((parent, chunk))
        yield chunk, parent


def block_hashes(tokens: list[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Hash chain of the leading full blocks before the last token (at most max_blocks)."""
    n = (len(tokens) - 1) // block_size
    return [h for _, h in hashed_blocks(tokens, block_size, n if max_blocks is None else min(n, max_blocks))]
