"""kernels/cpu_threads.py: a loop spread over torch's threads runs every index once, in the caller's
grad / inference mode, passes a part's error on, and leaves the thread count as it found it."""
import pytest
import torch

from devices import torch_threads
from kernels import cpu_threads


@pytest.mark.parametrize("threads,n", [(1, 5), (2, 5), (2, 1), (3, 7)])
def test_parallel_for_covers_each_index_once_in_callers_mode(threads, n):
    out = torch.zeros(n, dtype=torch.int64)
    with torch_threads(threads), torch.inference_mode():
        def work(lo, hi):
            out[lo:hi] += 1                     # in place on an inference tensor: needs the mode
            assert torch.is_inference_mode_enabled()
        cpu_threads.parallel_for(work, n, out.device)
        assert torch.get_num_threads() == threads
    assert out.tolist() == [1] * n


def test_parallel_for_passes_a_parts_error_on_and_restores_threads():
    def work(lo, hi):
        if lo > 0:
            raise ValueError(f"part {lo}-{hi}")
    with torch_threads(2):
        with pytest.raises(ValueError, match="part 2-4"):
            cpu_threads.parallel_for(work, 4, torch.device("cpu"))
        assert torch.get_num_threads() == 2


def test_parallel_for_in_a_forked_child_makes_its_own_pool():
    """The child of a fork has the parent's pool object but none of its threads: waiting on them
    would hang, so the child starts its own (the parent's pool exists before the fork here)."""
    import multiprocessing
    out = torch.zeros(4)
    with torch_threads(2):
        cpu_threads.parallel_for(lambda lo, hi: out[lo:hi].add_(1), 4, out.device)
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=cpu_threads.parallel_for, args=(lambda lo, hi: None, 4, out.device))
        child.start()
        child.join(timeout=30)
        alive = child.is_alive()
        if alive:
            child.kill()
    assert not alive and child.exitcode == 0
    assert out.tolist() == [1.0] * 4
