"""Request-level ordering: which waiting request is admitted (or released) first.

`make_order(name, **opts)` returns an Order with `key(req, now)` (smaller = served first). The same
object plugs into the global schedulers (`order=` of sbs / adp-balance) and into the rank-local
BatchScheduler (`order=`), both of which take a key function of a Request, via `order.as_key()`.

  fcfs      arrival time.
  sjf       shortest predicted job first: cost = prefill_weight * prompt tokens
            + decode_weight * predicted output tokens, minus aging_rate * waiting time.
            Output tokens are predicted by a JobPredictor (per-session history of observed output
            lengths, capped at max_tokens) when one is given, else max_tokens. With `cached`
            (e.g. prefix_hits(block_manager) in a rank's queue), prompt tokens already in the prefix
            cache are not counted: a long multi-turn prompt that is mostly cached is a short job.
  priority  larger `priority` first; effective priority = priority + aging_rate * waiting time.

Aging needs no clock at sort time (as_key() sorts exactly as key(., now) for every now), and with
aging rate a > 0 nothing arriving more than C/a after a request (C: the spread of base keys) is
served before it, which bounds every wait: docs/ordering.md has the cost model and the proofs.
"""
from collections import OrderedDict, deque

from scheduler.request import Request


class JobPredictor:
    """Predicted output tokens of a request from its client's (session_id's) recent outputs.

    observe(req) on finish; predict(req) = mean of the session's last `window` output lengths, else
    the mean over all sessions, else max_tokens; always capped at max_tokens (a hard limit)."""

    def __init__(self, window: int = 16, max_sessions: int = 65536):
        self.window, self.max_sessions = window, max_sessions
        self._hist: OrderedDict[str, deque] = OrderedDict()   # LRU over sessions: memory stays bounded
        self._total, self._count = 0, 0

    def observe(self, req: Request) -> None:
        n = req.num_output_tokens
        if n <= 0:
            return
        self._total, self._count = self._total + n, self._count + 1
        if req.session_id is None:
            return
        h = self._hist.pop(req.session_id, None) or deque(maxlen=self.window)
        h.append(n)
        self._hist[req.session_id] = h
        if len(self._hist) > self.max_sessions:
            self._hist.popitem(last=False)

    def predict(self, req: Request) -> float:
        h = self._hist.get(req.session_id) if req.session_id is not None else None
        if h:
            guess = sum(h) / len(h)
        elif self._count:
            guess = self._total / self._count
        else:
            return float(req.max_tokens)
        return min(float(req.max_tokens), guess)


class Order:
    """key(req, now): smaller first; ties go to the earlier arrival (then sort stability)."""
    name = "fcfs"
    aging_rate = 0.0

    def base(self, req: Request) -> float:
        return 0.0

    def key(self, req: Request, now: float) -> tuple:
        return (self.base(req) - self.aging_rate * (now - req.arrival_time), req.arrival_time)

    def as_key(self):
        """A now-free key function with the same order (see the module docstring)."""
        if self.name == "fcfs":
            return lambda r: r.arrival_time
        return lambda r: self.key(r, 0.0)


class SJF(Order):
    name = "sjf"

    def __init__(self, prefill_weight: float = 1.0, decode_weight: float = 0.25, aging_rate: float = 1000.0,
                 predictor: JobPredictor | None = None, cached=None):
        if prefill_weight < 0 or decode_weight < 0 or aging_rate < 0:
            raise ValueError("sjf weights and aging_rate must be >= 0")
        self.prefill_weight, self.decode_weight = prefill_weight, decode_weight
        self.aging_rate, self.predictor = aging_rate, predictor
        self.cached = cached   # req -> prompt tokens expected from the prefix cache (e.g. prefix_hits(bm))

    def predicted_output(self, req: Request) -> float:
        return self.predictor.predict(req) if self.predictor else float(req.max_tokens)

    def base(self, req: Request) -> float:
        # Remaining work: a preempted request re-queues with its outputs so far to recompute.
        left = max(0.0, self.predicted_output(req) - req.num_output_tokens)
        hit = min(self.cached(req), req.num_tokens - 1) if self.cached else 0
        return self.prefill_weight * (req.num_tokens - hit) + self.decode_weight * left


class Priority(Order):
    name = "priority"

    def __init__(self, aging_rate: float = 1.0):
        if aging_rate < 0:
            raise ValueError("aging_rate must be >= 0")
        self.aging_rate = aging_rate

    def base(self, req: Request) -> float:
        return -float(req.priority)


def prefix_hits(block_manager):
    """req -> prompt tokens this block manager holds cached for it right now: the lookup of
    allocate_prefix, read-only. A multi-turn prompt that is mostly cached is a short job."""
    return lambda req: len(block_manager.cached_blocks(req)) * block_manager.block_size


ORDERS = {"fcfs": Order, "sjf": SJF, "priority": Priority}


def make_order(name: str, **opts) -> Order:
    """'fcfs' | 'sjf' (prefill_weight, decode_weight, aging_rate [token-equivalents/s], predictor)
    | 'priority' (aging_rate [priority units/s])."""
    if name not in ORDERS:
        raise ValueError(f"unknown order {name!r}; choose one of {sorted(ORDERS)}")
    try:
        return ORDERS[name](**opts)
    except TypeError as e:
        raise ValueError(f"bad options for order {name!r}: {e}") from None


def rank_order(name: str, block_manager, **opts):
    """The `order` argument of a rank's BatchScheduler: "fcfs", or a now-free key (SJF counts the
    prompt tokens this rank's prefix cache already holds as free)."""
    if name == "fcfs":
        return "fcfs"
    if name == "sjf":
        opts.setdefault("cached", prefix_hits(block_manager))
    return make_order(name, **opts).as_key()


__all__ = ["JobPredictor", "Order", "SJF", "Priority", "make_order", "prefix_hits", "rank_order"]
