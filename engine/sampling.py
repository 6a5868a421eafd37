"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, min-p, seeds)."""
from dataclasses import dataclass

import torch


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


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks on one row (fp32)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = logits.softmax(-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Samples one token per row. A seeded request draws from its own generator, so its tokens do
    not depend on which other requests share the batch."""

    def __init__(self, seed: int = 0):
        self.default = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def skip(self, request_id: str, p: SamplingParams, vocab: int) -> None:
        """Advance a seeded request's generator past one draw (its first token was sampled on
        another rank), so its later tokens equal those of an unseparated run."""
        if p.seed is not None and not p.greedy:
            gen = self.generators.setdefault(request_id, torch.Generator().manual_seed(p.seed))
            torch.empty(vocab).exponential_(generator=gen)

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, (rid, p) in enumerate(zip(request_ids, params)):
            if p.greedy:
                out.append(greedy[i])
                continue
            gen = self.default
            if p.seed is not None:
                gen = self.generators.get(rid)
                if gen is None:
                    gen = self.generators[rid] = torch.Generator().manual_seed(p.seed)
            probs = _filter(logits[i].cpu(), p).softmax(-1)
            # exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p
            race = probs / torch.empty_like(probs).exponential_(generator=gen)
            out.append(int(race.argmax()))
        return out
