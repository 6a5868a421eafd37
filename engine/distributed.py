"""torch.distributed plumbing for DP attention + EP experts: topology from torchrun, the object
channel the coordinator uses each step, and bounded waits.

Gloo on CPU, NCCL on CUDA. Plans, loads, outputs and start-up agreements are the control plane:
CPU objects that travel over a gloo group (beside NCCL, created here; on CPU the main groups serve),
so NCCL carries only the data plane. Every collective has the process group's timeout, so a rank
that dies or stalls brings the others down with an error instead of a hang.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Topology":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_s: float) -> Topology:
    """Join the torchrun world (idempotent)."""
    topo = Topology.from_env()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(topo.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = control_group(list(range(topo.world_size)), None)
    return topo


_CONTROL = None   # the world's control-plane group (None: the default group, already gloo)


def control_group(ranks: list[int], main):
    """The control plane's group over `ranks`, beside the data-plane group `main`: `main` itself
    under gloo, a new gloo group under NCCL (every rank must call this, in the same order)."""
    return main if dist.get_backend() == "gloo" else dist.new_group(ranks, backend="gloo")


def device_for(topo: Topology, device) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", topo.local_rank)
    return device


class RankFailure(RuntimeError):
    pass


def new_group(ranks: list[int]):
    return dist.new_group(ranks)


def barrier() -> None:
    dist.barrier(group=_CONTROL)


def agree_min(value: int) -> int:
    """The smallest `value` over the whole world (every rank must call this)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_CONTROL)
    return int(t.item())


def broadcast_from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def share_secret(secret: bytes | None) -> bytes:
    """Rank 0's secret on every rank, as a raw byte tensor over the control group (no pickle)."""
    t = torch.zeros(256, dtype=torch.uint8)
    if secret is not None:
        if len(secret) > 255:
            raise ValueError("secret longer than 255 bytes")
        t[0] = len(secret)
        t[1:1 + len(secret)] = torch.frombuffer(bytearray(secret), dtype=torch.uint8)
    dist.broadcast(t, src=0, group=_CONTROL)
    return bytes(t[1:1 + int(t[0])].tolist())


def scheduler_address(port: int | None):
    """Where the global scheduler of a multi-instance world listens (on the master node)."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return (host, port or int(os.environ.get("MASTER_PORT", 29500)) + 1)


class LocalGroup:
    """The single-process channel (one rank, no communication). Every rank makes the same calls in
    the same order each step, which is what keeps ranks in lockstep."""
    rank = 0
    world_size = 1
    is_leader = True

    def gather(self, obj):
        """Every rank's obj, on the coordinator (None elsewhere)."""
        return [obj]

    def broadcast(self, obj):
        """The coordinator's obj, on every rank."""
        return obj


class DistGroup:
    """The leader's channel to the DP ranks of one instance (same calls as LocalGroup).
    `pg`: the instance's control-plane group (None: the whole world's); `leader`: its first rank."""

    def __init__(self, topo: Topology, pg=None, leader: int = 0, size: int | None = None):
        self.rank, self.pg, self.leader = topo.rank, pg if pg is not None else _CONTROL, leader
        self.world_size = size or topo.world_size
        self.is_leader = topo.rank == leader

    def _guard(self, what, fn):
        try:
            return fn()
        except Exception as e:  # gloo/nccl raise RuntimeError on a dead peer or a timeout
            raise RankFailure(f"rank {self.rank}: {what} failed: another rank died or stopped answering "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def gather(self, obj):
        out = [None] * self.world_size if self.is_leader else None
        self._guard("gather", lambda: dist.gather_object(obj, out, dst=self.leader, group=self.pg))
        return out

    def broadcast(self, obj):
        box = [obj]
        self._guard("broadcast", lambda: dist.broadcast_object_list(box, src=self.leader, group=self.pg))
        return box[0]
