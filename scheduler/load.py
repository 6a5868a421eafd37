"""The small load vector each rank reports to the coordinator every step."""
from dataclasses import dataclass


@dataclass
class RankLoad:
    rank: int
    num_running: int
    num_waiting: int
    waiting_prefill_tokens: int   # tokens still to prefill over waiting + partially prefilled requests
    running_tokens: int           # context tokens held by running requests
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    last_step_time_s: float = 0.0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_kv_blocks / self.total_kv_blocks if self.total_kv_blocks else 1.0
