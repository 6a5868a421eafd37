"""RMSNorm with an optional fused residual add (torch reference)."""
import torch
import torch.nn.functional as F

from . import cpu_native


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None):
    """y = weight * (x / rms(x)); with `residual`, x is first replaced by x + residual.

    Returns y, or (y, x + residual) when a residual is given, so a decoder layer can carry the
    running sum without a second pass. Statistics in fp32, cast back before the weight multiply
    (the order DeepSeek's and transformers' implementations use).
    """
    if x.dim() == 2 and x.shape[0] <= cpu_native.MAX_ROWS and cpu_native.usable(x, weight) and \
            (residual is None or (residual.shape == x.shape and cpu_native.usable(residual))):
        return cpu_native.rms_norm(x, weight, eps, residual)   # a decode step's rows: one call
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)   # the same math in one op (no casts to order)
    else:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * y.to(x.dtype)
    return y if residual is None else (y, residual)
