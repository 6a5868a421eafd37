"""FP8 (float8_e4m3fn) block quantization: 128x128 weight blocks, 1x128 activation groups.

Torch references. A weight [N, K] is stored as fp8 with `scale_inv` [ceil(N/128), ceil(K/128)] in
fp32; the real value of an element is fp8 * scale_inv of its block (edge blocks may be partial).
"""
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _expand_blocks(scale: torch.Tensor, shape, block: int) -> torch.Tensor:
    n, k = shape
    return scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def dequant_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [..., N, K] with scales [..., ceil(N/b), ceil(K/b)] -> dtype (leading dims: experts)."""
    if w.dim() == 3:
        return torch.stack([dequant_block_fp8(a, s, block, dtype) for a, s in zip(w, scale_inv)])
    return (w.float() * _expand_blocks(scale_inv.float(), w.shape, block)).to(dtype)


def _quant(w: torch.Tensor, rows: int, cols: int):
    """Quantize a 2-D tensor per rows x cols block so each block's absmax maps to FP8_MAX
    -> (fp8 of the same shape, fp32 scales [ceil(N/rows), ceil(K/cols)])."""
    n, k = w.shape
    nb, kb = -(-n // rows), -(-k // cols)
    pad = torch.zeros(nb * rows, kb * cols, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, rows, kb, cols)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.view(nb * rows, kb * cols)[:n, :k].to(FP8).contiguous(), scale.contiguous()


def quant_block_fp8(w: torch.Tensor, block: int = 128):
    """Weight [N, K] -> (fp8 [N, K], fp32 scale_inv [ceil(N/block), ceil(K/block)])."""
    return _quant(w, block, block)


def per_token_group_quant_fp8_torch(x: torch.Tensor, group: int = 128):
    """Activations [M, K] -> (fp8 [M, K], fp32 scales [M, ceil(K/group)])."""
    return _quant(x, 1, group)


def fp8_block_gemm_torch(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor,
                         block: int = 128, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """w8a8 reference: y = dequant(quant(x)) @ dequant(w).T, x [M, K], w fp8 [N, K]."""
    xq, xs = per_token_group_quant_fp8_torch(x, block)
    xd = xq.float() * xs.repeat_interleave(block, 1)[:, : x.shape[1]]
    y = xd @ dequant_block_fp8(w, w_scale_inv, block).t()
    return y.to(out_dtype or x.dtype)
