"""What crosses between the coordinator and the ranks: plain typed dataclasses of ints, floats,
strings, lists and dicts (and SamplingParams, itself one), so any transport can carry them."""
from dataclasses import dataclass, field

from scheduler.request import Request
from .sampling import SamplingParams


@dataclass
class RequestSpec:
    """A request as the coordinator hands it to a rank."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float

    def to_request(self, output_token_ids: list[int] = ()) -> Request:
        """The scheduler's Request for it (the one place one is built from SamplingParams)."""
        p = self.params
        return Request(self.request_id, self.prompt_token_ids, p.max_tokens, arrival_time=self.arrival_time,
                       priority=p.priority, session_id=p.session_id, output_token_ids=list(output_token_ids))


@dataclass
class TokenEvent:
    """One sampled token of one request, rank -> coordinator."""
    request_id: str
    token_id: int
    text_delta: str
    finish_reason: str | None
    time: float
    text: str | None = None   # full (stop-trimmed) text, set when the request finishes
    handoff: bool = False     # P/D: prefill done here, the request continues on a decode rank
    cached_tokens: int | None = None   # on a first token: prompt tokens served by the prefix cache


@dataclass
class StepStats:
    """What one rank's step computed, rank -> coordinator (the global scheduler's cost model)."""
    rank: int
    num_tokens: int
    step_time_s: float
    num_preempted: int
    context: float = 0.0      # attention query-key pairs (scheduler.allocation.attention_pairs)


@dataclass
class Send:
    """P/D: post this request's KV to decode rank `dst`."""
    request_id: str
    dst: int
    tag: int


@dataclass
class Recv:
    """P/D: receive a prefilled request's KV (its prompt rows) from prefill rank `src`."""
    spec: RequestSpec
    src: int
    tag: int
    first_token: int
    num_tokens: int
    src_address: str | None = None   # prefill rank in another world: its KV server (engine.kv_transfer)


@dataclass
class StepPlanMsg:
    """Broadcast to every rank of an instance at a step boundary (keys: global ranks)."""
    assignments: dict[int, list[RequestSpec]] = field(default_factory=dict)
    aborts: list[str] = field(default_factory=list)
    rebalance: bool = False   # re-place experts (EPLB) before this step
    stop: bool = False        # nothing left to do: leave the step loop
    run: bool = True          # some rank has work: every rank runs a forward (else none does)
    sends: dict[int, list[Send]] = field(default_factory=dict)   # P/D: KV to send, per prefill rank
    recvs: dict[int, list[Recv]] = field(default_factory=dict)   # P/D: KV to receive, per decode rank
    decode_only: bool = False # no rank prefills this step (EP: DeepEP's low-latency kernels)
    budgets: dict[int, int] | None = None   # rank -> token budget of this step (SBS level); None: full
