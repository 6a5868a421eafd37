"""Where kernel tests run: the CPU under the Triton interpreter (default, CI), or a real GPU with
STAGGER_TEST_DEVICE=cuda (compiled for real, bf16 added, outputs NaN-poisoned; bench/gpu_validate.py)."""
import contextlib
import functools
import os

import torch

DEVICE = torch.device(os.environ.get("STAGGER_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"

# the interpreter gets bf16 arithmetic wrong (raw bits): bf16 only where kernels compile for real
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _poisoned(make):
    """torch.empty-like allocator whose float outputs start as NaN: an element a kernel forgets to
    write shows up in the comparison instead of passing on leftover memory."""
    @functools.wraps(make)
    def alloc(*args, **kwargs):
        t = make(*args, **kwargs)
        if t.is_floating_point() and t.device.type == "cuda":
            t.fill_(float("nan"))
        return t
    return alloc


def _moved(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def on_device(fn):
    """Run a kernel wrapper on DEVICE with CPU tensors in and out: inputs are copied over, outputs
    come back to the CPU (references stay on the CPU), and tensors the kernel wrote in place (a KV
    cache) are copied back into the caller's tensors. Fresh float allocations are NaN-poisoned."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        dargs = [_moved(a) for a in args]
        dkw = {k: _moved(v) for k, v in kwargs.items()}
        saved = torch.empty, torch.empty_like, torch.Tensor.new_empty
        torch.empty, torch.empty_like = _poisoned(saved[0]), _poisoned(saved[1])
        torch.Tensor.new_empty = _poisoned(saved[2])
        try:
            out = fn(*dargs, **dkw)
            torch.cuda.synchronize()
        finally:
            torch.empty, torch.empty_like, torch.Tensor.new_empty = saved
        for a, d in list(zip(args, dargs)) + [(kwargs[k], dkw[k]) for k in kwargs]:
            if isinstance(a, torch.Tensor) and d is not a:
                a.copy_(d.cpu())
        return _back(out)
    return run


def _back(out):
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(_back(o) for o in out)
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to n for the block (the CPU references split their small-op
    loops over the threads: both ways must give the same result)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
