"""Pure-Python scheduling core (no torch): request state, KV block accounting, batch formation."""
from scheduler.request import Request, RequestStatus
from scheduler.load import RankLoad
from scheduler.block_manager import BlockManager
from scheduler.batch import BatchScheduler, ScheduledBatch

__all__ = ["Request", "RequestStatus", "RankLoad", "BlockManager", "BatchScheduler", "ScheduledBatch"]
