"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, min-p, seeds)."""
from dataclasses import dataclass

import torch

from .model_runner import to_device


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    priority: int = 0              # request-level ordering (larger = more urgent)
    session_id: str | None = None  # cache/rank affinity
    n: int = 1                     # completions per prompt (the server runs n requests)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(why):
            raise ValueError(f"invalid SamplingParams: {why}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            bad(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_M32 = 0xFFFFFFFF
TOPK_CAP = 1024   # rows that all ask for top_k <= this sample among topk() candidates, not a sort


def _mix32(x):
    """A 32-bit integer hash of a host int (per-request stream keys) or, elementwise, of an int64
    tensor. Values stay below 2**32 and constants below 2**31, so no int64 product overflows."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Counter-based noise in (0, 1): a hash of (row key, token id), so a request's draw depends only
    on its seed, its draw count and the token, never on its row or on the rest of the batch."""
    x = _mix32(keys[:, None] + token_ids * 0x9E3779B1)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


class Sampler:
    """Samples one token per row for the whole batch in a few tensor ops on the logits' device, with
    one host synchronization (the sampled ids).

    Every sampled request draws from its own counter-based stream: (seed, number of draws so far)
    keys a hash of the token id, and the token is an exponential race over the filtered
    distribution, argmax(log p - log E), E ~ Exp(1). A seeded request's tokens therefore do not
    depend on which other requests share the batch; an unseeded one gets a seed from the engine's
    generator on first sight. Greedy rows take the plain argmax (exact)."""

    def __init__(self, seed: int = 0):
        self.default = torch.Generator().manual_seed(seed)
        self.streams: dict[str, list[int]] = {}   # request id -> [seed key, draws so far]

    def _stream(self, request_id: str, p: SamplingParams) -> list[int]:
        st = self.streams.get(request_id)
        if st is None:
            seed = p.seed
            if seed is None:
                seed = int(torch.randint(0, 1 << 62, (), generator=self.default))
            st = self.streams[request_id] = [_mix32(seed ^ (seed >> 32)) ^ _mix32(seed >> 31), 0]
        return st

    def skip(self, request_id: str, p: SamplingParams) -> None:
        """Advance a seeded request's stream past one draw (its first token was sampled on another
        rank), so its later tokens equal those of an unseparated run."""
        if p.seed is not None and not p.greedy:
            self._stream(request_id, p)[1] += 1

    def forget(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: list[str],
                 params: list[SamplingParams]) -> list[int]:
        logits = logits.float()
        greedy = logits.argmax(-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return greedy.tolist()
        keys = []
        for i in rows:
            st = self._stream(request_ids[i], params[i])
            keys.append(_mix32(st[0] ^ _mix32(st[1] + 0x632BE5AB)))
            st[1] += 1
        picked = sample_rows(logits[rows] if len(rows) < len(params) else logits,
                             [params[i] for i in rows], keys)
        if len(rows) < len(params):
            greedy[torch.tensor(rows, device=logits.device)] = picked
            return greedy.tolist()
        return picked.tolist()


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], keys: list[int]) -> torch.Tensor:
    """Draw one token per row of fp32 `logits` [B, V] -> int64 ids [B] (on the logits' device).

    Candidates are the top max(top_k) tokens when every row sets a top_k <= TOPK_CAP (one batched
    topk), else the whole vocabulary sorted once for the batch. Then, as vLLM orders them:
    temperature, top-k, min-p (relative to the best probability), top-p (smallest prefix reaching
    the mass, at least one token), and the race."""
    dev, V = logits.device, logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if max(ks) <= TOPK_CAP:
        vals, idx = logits.topk(max(ks), dim=-1)          # sorted, descending
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
    K = vals.shape[1]
    temp = to_device([p.temperature for p in params], torch.float32, dev)
    vals = vals / temp[:, None]
    drop = torch.arange(K, device=dev)[None, :] >= to_device(ks, torch.int64, dev)[:, None]
    if any(p.min_p > 0 for p in params):
        probs = vals.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= probs < to_device([p.min_p for p in params], torch.float32, dev)[:, None] * probs[:, :1]
    if any(p.top_p < 1 for p in params):
        probs = vals.masked_fill(drop, float("-inf")).softmax(-1)
        top_p = to_device([p.top_p if p.top_p < 1 else 2.0 for p in params], torch.float32, dev)
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    key_t = to_device(keys, torch.int64, dev)
    race = vals.masked_fill(drop, float("-inf")) - torch.log(-torch.log(_uniform(key_t, idx)))
    return idx.gather(1, race.argmax(-1, keepdim=True)).squeeze(1)
