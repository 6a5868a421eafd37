"""Allocation helpers for the global schedulers (pure Python, deterministic): the step cost model,
each rank's capacity for its next step (RankSlot), prefill water-filling and decode-side balance."""
from dataclasses import dataclass, replace


def attention_pairs(num_new: int, num_computed: int) -> float:
    """Query-key pairs of a causal chunk of `num_new` tokens after `num_computed` cached ones."""
    return num_new * (num_computed + (num_new + 1) / 2)


# ---- step cost model ------------------------------------------------------------------------------
def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny systems only)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            raise ZeroDivisionError("singular system")
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                for k in range(c, n + 1):
                    m[r][k] -= f * m[c][k]
    return [m[i][n] / m[i][i] for i in range(n)]


class StepCostModel:
    """t(rank step) ~= c0 + c_tok * tokens + c_ctx * context, context in query-key pairs.

    Fitted online: each observed step contributes the features of the rank whose predicted cost was
    highest (the lockstep step lasts as long as the slowest rank). The fit minimizes
    sum_i decay^(age_i) (t_i - x_i.c)^2 + ridge * |c - prior|^2 in scaled units (tokens/1e3,
    pairs/1e6), so with no data it returns the prior and it never goes singular. Coefficients are
    clamped at zero: more work never predicts a shorter step.
    """
    SCALE = (1.0, 1e-3, 1e-6)

    def __init__(self, prior=(0.01, 2e-5, 1e-9), decay: float = 0.995, ridge: float = 1e-3):
        self.prior = [p / s for p, s in zip(prior, self.SCALE)]   # in scaled units
        self.decay, self.ridge = decay, ridge
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self.coef = list(self.prior)
        self.num_obs = 0

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(c0 [s], c_tok [s/token], c_ctx [s/pair])."""
        return tuple(c * s for c, s in zip(self.coef, self.SCALE))

    def marginal(self, tokens: float, context: float) -> float:
        c = self.coef
        return c[1] * tokens * 1e-3 + c[2] * context * 1e-6

    def predict(self, tokens: float, context: float) -> float:
        return self.coef[0] + self.marginal(tokens, context)

    def observe(self, step_time_s: float, tokens: float, context: float) -> None:
        x = (1.0, tokens * 1e-3, context * 1e-6)
        d = self.decay
        for i in range(3):
            self._xty[i] = d * self._xty[i] + x[i] * step_time_s
            for j in range(3):
                self._xtx[i][j] = d * self._xtx[i][j] + x[i] * x[j]
        self.num_obs += 1
        a = [[self._xtx[i][j] + (self.ridge if i == j else 0.0) for j in range(3)] for i in range(3)]
        b = [self._xty[i] + self.ridge * self.prior[i] for i in range(3)]
        try:
            coef = _solve(a, b)
        except ZeroDivisionError:
            return
        self.coef = [max(0.0, c) for c in coef]


# ---- per-rank capacity for the next step -----------------------------------------------------------
@dataclass
class RankSlot:
    rank: int
    seqs: int            # free sequence slots
    tokens: int          # token budget left in the next step (may go negative once filled)
    blocks: int          # free KV blocks after reserving the rank's queued prefill
    fill: float          # predicted marginal cost of the rank's next step (work already there)
    running: int         # sequences running or queued on the rank (optimistic)
    kv_usage: float
    total_blocks: int
    idle: bool           # no work at all: it can take a new batch right now
    excluded: bool = False


def rank_slots(loads, cost: StepCostModel, watermark: float = 0.01, budgets=None) -> list[RankSlot]:
    """Capacity of each reported rank for its very next step. `watermark` keeps a fraction of the
    KV pool free for the growth of running decodes; `budgets` (rank -> tokens) replaces a rank's
    max_num_batched_tokens for this step (SBS's level budgets)."""
    slots = []
    for ld in loads:
        decodes = ld.num_running   # one token each (slight overcount for partial prefills)
        queued = ld.waiting_prefill_tokens
        cap = ld.max_num_batched_tokens
        if budgets is not None:
            cap = budgets.get(ld.rank, cap)
        budget = cap - decodes - queued
        reserve = -(-queued // ld.block_size) + int(watermark * ld.total_kv_blocks)
        step_tokens = decodes + min(queued, max(0, cap - decodes))
        fill = cost.marginal(step_tokens, ld.running_tokens)
        slots.append(RankSlot(
            rank=ld.rank, seqs=ld.max_num_seqs - ld.num_running - ld.num_waiting, tokens=budget,
            blocks=ld.free_kv_blocks - reserve, fill=fill, running=ld.num_running + ld.num_waiting,
            kv_usage=ld.kv_usage, total_blocks=ld.total_kv_blocks,
            idle=ld.num_running == 0 and ld.num_waiting == 0))
    return slots


def take(s: RankSlot, tokens: int, blocks: int, cost: float = 0.0) -> None:
    """Book one more sequence on `s` for its next step: `tokens` of its budget, `blocks` of KV."""
    s.seqs, s.running, s.fill = s.seqs - 1, s.running + 1, s.fill + cost
    s.tokens, s.blocks = s.tokens - tokens, s.blocks - blocks
    s.kv_usage += blocks / max(1, s.total_blocks)


def place_in_order(requests, place, strict: int = 0):
    """Requests in priority order, each to the rank `place(req)` names (None: fits nowhere now; it
    stays, and the ones behind it may still go), except that the first `strict` (aged) requests are
    a strict head of line: when one of them fits nowhere, nothing behind it is placed.
    Returns ({rank: [requests]}, [unassigned])."""
    out, left = {}, []
    for i, req in enumerate(requests):
        rank = place(req)
        if rank is None and i < strict:
            left.extend(requests[i:])
            break
        if rank is None:
            left.append(req)
        else:
            out.setdefault(rank, []).append(req)
    return out, left


def water_level(work: list[float], amount: float) -> float:
    """The level L at which pouring `amount` onto ranks already holding `work` fills them evenly:
    sum(max(0, L - w)) == amount (ranks above L take none of it)."""
    if not work:
        return 0.0
    ws = sorted(work)
    below = 0.0
    for i, w in enumerate(ws):
        below += w
        level = (amount + below) / (i + 1)
        if i + 1 == len(ws) or level <= ws[i + 1]:
            return level
    return level


# ---- prefill: water-filling -----------------------------------------------------------------------
def water_fill(requests, slots: list[RankSlot], cost: StepCostModel, block_size: int,
               hits=lambda req, rank: 0, strict: int = 0, lpt: bool = False):
    """Assign `requests` (already in priority order) to ranks that can start them next step.

    Each request goes to the eligible rank whose predicted step after adding it is cheapest
    (least filled, prefix-cache hits lowering the cost where `hits(req, rank)` knows of some); ties
    go to fewer sequences, then lower KV use, then the lower rank id. A rank is eligible while it
    has a free sequence slot, a positive token budget (the request starts with a chunk of it) and
    the KV blocks for the whole prompt; `strict`: see place_in_order. With `lpt`, the chosen set is
    placed again largest first (longest-processing-time order balances the ranks better than
    arrival order), if that placement fits too. Mutates `slots`. Returns (placed, unassigned)."""
    base = [replace(s) for s in slots] if lpt else None
    pool = [s for s in slots if not s.excluded] or slots
    out, left = place_in_order(requests, lambda req: _place(req, pool, cost, block_size, hits), strict)
    if lpt and sum(len(v) for v in out.values()) > 1:
        chosen = sorted((r for v in out.values() for r in v), key=lambda r: -r.num_tokens)
        again, miss = water_fill(chosen, base, cost, block_size, hits)
        if not miss:
            for s, b in zip(slots, base):
                s.__dict__.update(b.__dict__)
            out = again
    return out, left


def _place(req, pool, cost, block_size, hits) -> int | None:
    n = req.num_tokens
    best, best_key = None, None
    for s in pool:
        if s.seqs <= 0 or s.tokens <= 0:
            continue
        h = min(hits(req, s.rank), n - 1)
        need = -(-(n + 1 - h) // block_size)
        if need > s.blocks:
            continue
        inc = cost.marginal(n - h, attention_pairs(n - h, h))
        key = (s.fill + inc, s.running, s.kv_usage, s.rank)
        if best_key is None or key < best_key:
            best, best_key, best_take = s, key, (n - h, need, inc)
    if best is None:
        return None
    take(best, *best_take)
    return best.rank


# ---- decode: IQR exclusion, then fewest sequences, then lowest KV use ----------------------------------
def quantile(values: list[float], p: float) -> float:
    """The p-quantile (p in [0, 1]) of non-empty `values`, interpolating between order statistics."""
    xs = sorted(values)
    pos = p * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def iqr_outliers(values: list[float], k: float = 1.5, min_gap: float = 0.05) -> set[int]:
    """Indices whose value lies above Q3 + max(k * IQR, min_gap). Only the high side matters (a rank
    with unusually full KV); fewer than 4 values give no outliers."""
    if len(values) < 4:
        return set()
    q1, q3 = quantile(values, 0.25), quantile(values, 0.75)
    bound = q3 + max(k * (q3 - q1), min_gap)
    return {i for i, v in enumerate(values) if v > bound}


def choose_decode_rank(slots: list[RankSlot], blocks_needed: int = 0) -> RankSlot | None:
    """Pick the rank for a request that will decode: IQR KV outliers excluded (unless that leaves
    nothing), then fewest sequences, then lowest KV use, then lowest rank id. Ranks without a free
    sequence slot or `blocks_needed` free blocks are skipped; None when no rank can take it."""
    out = iqr_outliers([s.kv_usage for s in slots])
    fits = [i for i, s in enumerate(slots) if s.seqs > 0 and s.blocks >= blocks_needed]
    pool = [slots[i] for i in fits if i not in out] or [slots[i] for i in fits]
    if not pool:
        return None
    return min(pool, key=lambda s: (s.running, s.kv_usage, s.rank))
