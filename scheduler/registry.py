"""Global schedulers by name, and the one each becomes in a decode pool (P/D separation)."""
from scheduler.base import GlobalScheduler
from scheduler.baselines import AdpBalance, ImmediateLeastLoad, ImmediateRoundRobin
from scheduler.routing import ImmediateGimbal
from scheduler.sbs import StaggeredBatchScheduler

SCHEDULERS = {c.name: c for c in (ImmediateRoundRobin, ImmediateLeastLoad, StaggeredBatchScheduler,
                                  AdpBalance, ImmediateGimbal)}


def make_global_scheduler(name: str, num_ranks: int, **options) -> GlobalScheduler:
    """`instances=M` tells how the ranks split into M lockstep groups (only adp-balance, whose queues
    are per instance, needs it; the others see instances through the groups plan() receives).
    `role="decode"` builds the scheduler of a decode pool."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(SCHEDULERS))}")
    # role="decode": placement only, nothing held. adp-balance decodes as immediate-lb (without its
    # options); sbs uses its decode-side rule; the others place as they do for prefill.
    if options.get("role") == "decode" and name == "adp-balance":
        name, options = "immediate-lb", {"role": "decode"}
    if name != "adp-balance":
        options.pop("instances", None)
    try:
        return SCHEDULERS[name](num_ranks, **options)
    except TypeError as e:
        raise ValueError(f"bad options for scheduler {name!r}: {e}") from None
