"""What the engine hands back per request."""
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    release_time: float | None = None      # when the scheduler released it to a rank
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    rank: int | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def e2e(self) -> float | None:
        """Arrival to finish."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Time held in the scheduler's buffer."""
        return None if self.release_time is None else self.release_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None       # "stop" | "length" | "abort" | "error: ..."
    metrics: RequestMetrics | None = None
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by the latest step
    params: object = field(default=None, repr=False)        # the request's SamplingParams
    num_cached_tokens: int = 0                              # prompt tokens the prefix cache served

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
