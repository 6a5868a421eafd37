"""Per-request state. Plain data: the engine and the simulator drive the same objects."""
import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = enum.auto()   # queued on a rank (new, or preempted and due for recompute)
    RUNNING = enum.auto()   # admitted: holds KV blocks and is scheduled every step
    FINISHED = enum.auto()


# eq=False: requests are identities (kept in sets, removed from lists by `is`), never compared by value.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float = 0.0
    priority: int = 0                    # larger = more urgent (request-level ordering)
    session_id: str | None = None        # for stickiness
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose KV is in the cache
    num_cached_tokens: int = 0           # prefix-cache hits found at (last) admission
    block_table: list[int] = field(default_factory=list)   # physical KV block ids
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error: <msg>"
    # Timings, set by whoever drives the request (engine or simulator), in seconds on one clock.
    release_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        # Own a list: callers may pass a tuple or a list they keep mutating.
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        # Recompute after preemption covers prompt + outputs so far, so the KV cache sees both.
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode reads one token)."""
        p = self.prompt_token_ids
        if end <= len(p):
            return p[start:end]
        if start >= len(p):
            return self.output_token_ids[start - len(p):end - len(p)]
        return p[start:] + self.output_token_ids[:end - len(p)]

    @property
    def remaining_tokens(self) -> int:
        """Tokens whose KV still has to be computed (the last one yields the next sample)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens}, computed={self.num_computed_tokens})")


def check_request(num_prompt_tokens: int, max_tokens: int, max_model_len: int, num_blocks: int,
                  block_size: int, room: int = 0) -> None:
    """ValueError unless a request can run: a prompt, max_tokens >= 1, and the prompt plus `room`
    tokens to generate within max_model_len and within a rank's whole KV pool."""
    n = num_prompt_tokens
    if n == 0:
        raise ValueError("empty prompt: at least one token is needed")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if n + room > max_model_len:
        raise ValueError(f"prompt of {n} tokens leaves no room to generate within the context length "
                         f"max_model_len={max_model_len}")
    need = -(-(n + room) // block_size)
    if need > num_blocks:
        raise ValueError(f"prompt of {n} tokens needs {need} KV blocks of {block_size}, but a rank's "
                         f"pool has only {num_blocks}: it can never fit")
