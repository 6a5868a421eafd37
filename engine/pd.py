"""Prefill/decode separation: moving a request's latent KV from a prefill rank to a decode rank.

After its prefill (the first token sampled), a request stops on its prefill rank; the coordinator
picks a decode rank and tells both sides at their next step boundaries. Both post non-blocking
point-to-point operations (tagged per transfer, so no ordering between pairs can deadlock) and
poll them at later boundaries: neither instance's step loop ever waits for the other.
"""
import threading
import time

import torch
import torch.distributed as dist

from kernels import ops
from scheduler.block_manager import slots as token_slots


def gather_rows(kv_caches, block_table, n: int) -> torch.Tensor:
    """[layers, n, D]: the first n cached latent rows of one sequence in every layer."""
    row = torch.tensor(block_table, dtype=torch.int64, device=kv_caches[0].device)
    return torch.stack([ops.gather_kv(c, row, n) for c in kv_caches])


def scatter_rows(kv_caches, block_table, rows: torch.Tensor) -> None:
    bs = kv_caches[0].shape[1]
    n = rows.shape[1]
    slots = torch.tensor(token_slots(block_table, 0, n, bs), device=rows.device)
    for cache, layer_rows in zip(kv_caches, rows):
        cache.view(-1, cache.shape[-1])[slots] = layer_rows


class Transfers:
    """In-flight KV transfers of one rank, with a deadline each. Gloo completes point-to-point
    work only inside wait(), so each transfer is waited on by a helper thread and the step loop
    just checks its flag."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        # (done flag, [result: the tensor, or the exception that ended the transfer], deadline, on_done)
        self.pending: list[tuple[threading.Event, list, float, object]] = []

    def _expect(self, done: threading.Event, box: list, on_done) -> None:
        self.pending.append((done, box, time.time() + self.timeout_s, on_done))

    def _track(self, work, tensor, on_done):
        done = threading.Event()

        def waiter():
            try:
                work.wait()
            finally:
                done.set()
        threading.Thread(target=waiter, daemon=True).start()
        self._expect(done, [tensor], on_done)

    def send(self, tensor: torch.Tensor, dst: int, tag: int, on_done) -> None:
        tensor = tensor.contiguous()
        self._track(dist.isend(tensor, dst=dst, tag=tag), tensor, on_done)

    def recv(self, shape, dtype, device, src: int, tag: int, on_done) -> None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        self._track(dist.irecv(buf, src=src, tag=tag), buf, on_done)

    def poll(self, wait: bool = False) -> None:
        """Finish whatever has completed (all of it with wait=True); a transfer that failed or is
        past its deadline is an error, never a silent hang."""
        still = []
        for done, box, deadline, on_done in self.pending:
            if done.wait(max(0.0, deadline - time.time()) if wait else 0):
                if isinstance(box[0], Exception):
                    raise RuntimeError(f"KV transfer failed: {box[0]}")
                on_done(box[0])
            elif time.time() > deadline:
                raise RuntimeError(f"KV transfer did not complete within {self.timeout_s} s: the peer "
                                   "is gone or stuck")
            else:
                still.append((done, box, deadline, on_done))
        self.pending = still
