"""Request routing after Gimbal (arXiv 2602.21626, FACTS.md): which DP rank a request goes to on
arrival (not the expert all-to-all, engine/ep.py's dispatch). choose_rank, in this order:
  1. skip ranks whose KV use is >= kv_high (all of them full: the least full one);
  2. session stickiness: the session's last rank, unless overloaded;
  3. prefix affinity: the rank that most recently took a prompt with the same leading block(s),
     unless overloaded;
  4. if KV use among the remaining ranks differs by more than kv_gap: the lowest KV use;
  5. else the lowest score = queued prefill tokens + this request's tokens net of the prefix-cache
     hits the rank likely has.
"Overloaded": score more than sticky_gap_tokens above the lowest score. Ties go to the lower rank
id; nothing is random, so every rank that replays the same calls agrees. Candidates include the
work sent since their report (`with_pending`); the caller records its choice (`state.record`), so
choose_rank has no side effect.
"""
from collections import OrderedDict
from dataclasses import dataclass, replace

from scheduler.baselines import Immediate
from scheduler.load import RankLoad
from scheduler.prefix import block_hashes
from scheduler.request import Request


@dataclass
class RoutingParams:
    kv_high: float = 0.9             # KV use at or above which a rank takes no new work
    sticky_gap_tokens: int = 3000    # stickiness / affinity yield when the rank is this far above the minimum
    kv_gap: float = 0.10             # KV use spread above which KV use decides
    prefix_blocks: int | None = None  # leading full blocks hashed for affinity and hit estimates (None:
                                      # all; a 16-block cap halved the hits of long multi-turn prompts)
    block_size: int | None = None    # None: the candidates' block_size
    sticky: bool = True
    prefix_affinity: bool = True


class RoutingState:
    """Sticky rank per session and last rank per prefix hash, both LRU-bounded."""

    def __init__(self, max_entries: int = 1 << 18):
        self.max_entries = max_entries
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.prefixes: OrderedDict[int, int] = OrderedDict()

    def _put(self, table: OrderedDict, key, rank: int) -> None:
        table[key] = rank
        table.move_to_end(key)
        if len(table) > self.max_entries:
            table.popitem(last=False)

    def record(self, req: Request, rank: int, block_size: int, params: RoutingParams | None = None) -> None:
        p = params or RoutingParams()
        if req.session_id is not None:
            self._put(self.sessions, req.session_id, rank)
        for h in block_hashes(req.prompt_token_ids, p.block_size or block_size, p.prefix_blocks):
            self._put(self.prefixes, h, rank)

    def hits(self, chain: list[int], rank: int, block_size: int) -> int:
        """Prompt tokens `rank` likely has cached: up to the deepest chain block last sent there (a
        chain hash covers every block before it). An estimate: the rank's cache decides."""
        for i in range(len(chain) - 1, -1, -1):
            if self.prefixes.get(chain[i]) == rank:
                return (i + 1) * block_size
        return 0

    def affinity(self, chain: list[int]) -> int | None:
        """Rank that last took the deepest known block of this prompt's chain."""
        for h in reversed(chain):
            if h in self.prefixes:
                return self.prefixes[h]
        return None


def with_pending(load: RankLoad, tokens: int) -> RankLoad:
    """`load` plus `tokens` of prefill sent since the report (queued, and KV blocks they will take)."""
    if not tokens:
        return load
    blocks = -(-tokens // load.block_size)
    return replace(load, waiting_prefill_tokens=load.waiting_prefill_tokens + tokens,
                   free_kv_blocks=load.free_kv_blocks - blocks)


def choose_rank(req: Request, candidates: list[RankLoad], state: RoutingState,
                params: RoutingParams | None = None) -> int:
    if not candidates:
        raise ValueError("choose_rank needs at least one candidate rank")
    p = params or RoutingParams()
    bs = p.block_size or candidates[0].block_size
    chain = block_hashes(req.prompt_token_ids, bs, p.prefix_blocks) if p.prefix_affinity else []
    n = req.num_tokens
    score = {c.rank: c.waiting_prefill_tokens + n - min(state.hits(chain, c.rank, bs), n - 1)
             for c in candidates}
    kv = {c.rank: c.kv_usage for c in candidates}
    pool = [c.rank for c in candidates if kv[c.rank] < p.kv_high]
    if not pool:
        return min(kv, key=lambda r: (kv[r], score[r], r))
    low = min(score[r] for r in pool)

    def fits(rank):
        return rank in pool and score[rank] - low <= p.sticky_gap_tokens
    if p.sticky and req.session_id is not None and fits(state.sessions.get(req.session_id)):
        return state.sessions[req.session_id]
    if chain and fits(r := state.affinity(chain)):
        return r
    if max(kv[r] for r in pool) - min(kv[r] for r in pool) > p.kv_gap:
        return min(pool, key=lambda r: (kv[r], score[r], r))
    return min(pool, key=lambda r: (score[r], kv[r], r))


def _blank(rank: int, block_size: int) -> RankLoad:
    """A rank that has not reported yet counts as empty."""
    return RankLoad(rank, 0, 0, 0, 0, free_kv_blocks=1, total_kv_blocks=1, block_size=block_size,
                    max_num_seqs=1, max_num_batched_tokens=1)


class ImmediateGimbal(Immediate):
    """Assign on arrival by choose_rank over all ranks' last reports plus what was sent or assigned
    to them since (optimistic); the request then waits in that rank's local queue."""
    name = "immediate-gimbal"

    def __init__(self, num_ranks: int, role: str = "prefill", block_size: int = 64, **params):
        super().__init__(num_ranks, role)
        try:
            self.params = RoutingParams(**params)
        except TypeError as e:
            raise TypeError(f"unknown dispatch option (request routing): {e}") from None
        self.block_size = block_size   # until a report says otherwise
        self.state = RoutingState()

    def pick(self, req: Request) -> int:
        bs = next(iter(self.loads.values())).block_size if self.loads else self.block_size
        cands = [with_pending(self.loads.get(r) or _blank(r, bs), self.sent[r] + self.queued[r])
                 for r in range(self.num_ranks)]
        rank = choose_rank(req, cands, self.state, self.params)
        self.state.record(req, rank, bs, self.params)
        return rank


__all__ = ["RoutingParams", "RoutingState", "ImmediateGimbal", "choose_rank", "with_pending"]
