"""The C kernels of the CPU path (kernels/cpu_native.c): small-batch fp32 GEMMs, the routed
experts and the MLA decode of a decode step, which read each weight (or cache row) once while they
compute (MKL's small-row sgemm reads, then computes).

Built on first use with the system's C compiler into a cache folder keyed by the source's hash
(`STAGGER_CACHE_DIR`, default ~/.cache/stagger), then loaded with ctypes (whose calls release the
GIL). Each call splits its work over torch's thread count with a pool of C threads of its own.
`STAGGER_NATIVE=0` turns them off; so does a machine without a compiler (the torch path then
serves, and one warning says why).
"""
import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_suffix(".c")
_lib = None          # the loaded library, False once it could not be had
# Up to this many rows the C GEMM beat MKL's on a 2-core Zen 1 (1.07-2.2x at 8-64 rows, 512-4096
# columns, one thread; about even at 128-256), so larger GEMMs stay with MKL.
MAX_ROWS = 64


def _build() -> Path:
    src = _SRC.read_bytes()
    cache = Path(os.environ.get("STAGGER_CACHE_DIR", Path.home() / ".cache" / "stagger"))
    out = cache / f"cpu_native-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: ranks starting together never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-O3", "-shared", "-fPIC", "-o", tmp, str(_SRC), "-lm", "-lpthread"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def library():
    """The loaded C library, or None (turned off, or no compiler: warned once)."""
    global _lib
    if _lib is None:
        if os.environ.get("STAGGER_NATIVE", "1") == "0":
            _lib = False
        else:
            try:
                lib = ctypes.CDLL(str(_build()))
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or e
                warnings.warn(f"CPU C kernels unavailable, using torch's: {detail}", stacklevel=2)
                _lib = False
            else:
                p, i = ctypes.c_void_p, ctypes.c_int
                lib.stagger_linear.argtypes = [p, i, i, p, i, p, i]
                lib.stagger_linear.restype = None
                lib.stagger_moe_experts.argtypes = [p, p, i, p, p, i, i, p, i]
                lib.stagger_moe_experts.restype = ctypes.c_int
                lib.stagger_mla_decode.argtypes = [p, i, i, p, i, p, i, i, p, p, p, i, ctypes.c_float, p, i]
                lib.stagger_mla_decode.restype = ctypes.c_int
                lib.stagger_rms_norm.argtypes = [p, p, p, p, i, i, ctypes.c_float, p]
                lib.stagger_rms_norm.restype = None
                lib.stagger_linear_heads.argtypes = [p, i, i, i, i, i, p, i, p, i, i, i]
                lib.stagger_linear_heads.restype = ctypes.c_int
                _lib = lib
    return _lib or None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can take these tensors: fp32, contiguous, on the CPU, library built."""
    if (_lib or library()) is None:
        return False
    for t in tensors:   # a loop of cheap properties: this runs before every small GEMM of a step
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T, for fp32 contiguous CPU tensors (see `usable`); the columns are split
    over torch's threads."""
    M, K = x.shape
    y = x.new_empty(M, w.shape[0])
    threads = torch.get_num_threads()
    library().stagger_linear(x.data_ptr(), M, K, w.data_ptr(), w.shape[0], y.data_ptr(), threads)
    return y


def moe_experts(xs, offsets, w13, w2, ys) -> None:
    """Every expert over rows sorted by expert (`offsets` int64 [E + 1]: expert e's rows are
    offsets[e] .. offsets[e + 1]); ys rows written. Experts split over torch's threads."""
    inter, hidden = w2.shape[-1], w2.shape[-2]
    rc = library().stagger_moe_experts(xs.data_ptr(), offsets.data_ptr(), w13.shape[0], w13.data_ptr(),
                                       w2.data_ptr(), hidden, inter, ys.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("CPU MoE kernel: no scratch memory")


def mla_decode(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, tok: torch.Tensor,
               seq: torch.Tensor, rows: torch.Tensor, latent: int, scale: float, out: torch.Tensor) -> None:
    """Query tokens tok[i] of q [T, H, D] over the first rows[i] rows of sequence seq[i] in the
    paged cache [pages, page, D] (its pages: row seq[i] of `tables`); int32 index tensors:
    out[tok[i]] [H, latent] = softmax(scale q kv^T) kv[:, :latent]. Tokens split over torch's threads."""
    T, H, D = q.shape
    for t in (tables, tok, seq, rows):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError("mla_decode: index tensors must be contiguous int32")
    rc = library().stagger_mla_decode(q.data_ptr(), H, D, cache.data_ptr(), cache.shape[1], tables.data_ptr(),
                                      tables.shape[1], tok.shape[0], tok.data_ptr(), seq.data_ptr(),
                                      rows.data_ptr(), latent, scale, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("CPU MLA decode kernel: no scratch memory")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """kernels.rmsnorm's contract (y, or (y, x + residual)) for fp32 contiguous CPU tensors."""
    n = x.shape[-1]
    y = torch.empty_like(x)
    total = None if residual is None else torch.empty_like(x)
    library().stagger_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                               None if total is None else total.data_ptr(), weight.data_ptr(),
                               x.numel() // n, n, eps, y.data_ptr())
    return y if total is None else (y, total)


def heads_usable(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """linear_heads' conditions: fp32 CPU tensors, x and out with unit stride in their last dim
    (views of a wider row are fine), w contiguous, at most MAX_ROWS tokens."""
    return (x.shape[0] <= MAX_ROWS and x.stride(-1) == 1 and out.stride(-1) == 1 and usable(w)
            and x.dtype is torch.float32 and out.dtype is torch.float32 and x.is_cpu and out.is_cpu)


def linear_heads(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[t, h] = x[t, h] @ w[h]^T: x [T, H, K], w [H, N, K], out [T, H, N] (see heads_usable)."""
    T, H, K = x.shape
    rc = library().stagger_linear_heads(x.data_ptr(), T, H, K, x.stride(0), x.stride(1), w.data_ptr(),
                                        w.shape[1], out.data_ptr(), out.stride(0), out.stride(1),
                                        torch.get_num_threads())
    if rc != 0:
        raise MemoryError("CPU per-head GEMM: no scratch memory")
