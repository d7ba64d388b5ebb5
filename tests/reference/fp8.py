"""The references `kernels.fp8` is tested against: `act_quant_torch`, `weight_dequant_torch`, `fp8_gemm_torch` and
`fp8_linear_torch`, each with the same signature as its Triton wrapper (`act_quant`, `weight_dequant`,
`fp8_gemm`, `fp8_linear`) and the same input checks (the kernel module's own), in plain fp32 torch math, plus
`ceil_pow2_torch` (UE8M0 scale rounding). The served code does not call them: the CPU path dequantizes FP8
weights with `inference/model/layout.py`; `tests/hf_checkpoints.py` and `bench/engine.py` use
`weight_dequant_torch` to write dequantized checkpoints.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.fp8 import BLOCK, _act_quant_check, _dequant_check, _gemm_check, _linear_out
from deepseek_mcp.kernels.util import FP8_DTYPE, FP8_MAX, cdiv


def ceil_pow2_torch(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s for positive normal fp32 s, exactly (UE8M0 scale rounding)."""
    bits = s.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def act_quant_torch(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None, *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `act_quant`: x [..., K] -> (e4m3 [..., K], fp32 scales [..., ceil(K/block_size)])."""
    y, s, ue8m0 = _act_quant_check(x, block_size, scale_fmt, out)
    k = x.shape[-1]
    kb = cdiv(k, block_size)
    xf = torch.nn.functional.pad(x.float().reshape(-1, k), (0, kb * block_size - k)).view(-1, kb, block_size)
    scale = xf.abs().amax(-1).clamp(min=1e-4) / FP8_MAX  # [M, kb]
    if ue8m0:
        scale = ceil_pow2_torch(scale)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # round to nearest even
    y.copy_(q.view(-1, kb * block_size)[:, :k].view(x.shape))
    s.copy_(scale.view(s.shape))
    return y, s


def weight_dequant_torch(
    w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `weight_dequant`: w [N, K] e4m3, scale_inv [ceil(N/bs), ceil(K/bs)] fp32 -> [N, K] dtype."""
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    if tuple(scale_inv.shape) != (nb, kb):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} "
                         f"with {block_size}x{block_size} blocks (expected {(nb, kb)})")
    scale = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    y = (w.float() * scale).to(dtype)  # [N, K]
    if out is None:
        return y
    return _dequant_check(w, scale_inv, block_size, dtype, out).copy_(y)


def fp8_gemm_torch(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `fp8_gemm`: dequantize both operands to fp32, one fp32 matmul, cast."""
    c = _gemm_check(a, a_scale, b, b_scale, out)
    k = a.shape[1]
    a_deq = a.float() * a_scale.repeat_interleave(BLOCK, 1)[:, :k]  # [M, K]
    b_deq = weight_dequant_torch(b, b_scale, BLOCK)  # [N, K]
    return c.copy_(a_deq @ b_deq.T)


def fp8_linear_torch(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, scale_fmt: str | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `fp8_linear`: act_quant_torch + fp8_gemm_torch."""
    out2 = _linear_out(x, w, out)
    xq, xs = act_quant_torch(x.reshape(-1, x.shape[-1]), BLOCK, scale_fmt)
    y = fp8_gemm_torch(xq, xs, w, w_scale, out=out2)
    return y.view(*x.shape[:-1], w.shape[0])
