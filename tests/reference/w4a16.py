"""The references `kernels.w4a16` is tested against: `w4a16_gemm_torch`, `w4a16_moe_gemm_torch` and the W8A16
`w8a16_gemm_torch`, `w8a16_moe_gemm_torch`, with the same
signatures and input checks as the Triton wrappers, in fp32 math (the 4-bit weight dequantized exactly, then one
matmul, per expert that has rows). The CPU path dequantizes inside the model (`int4.dequant_int4`), not through
these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_mcp.kernels.util import check_tensor, out_or_new
from deepseek_mcp.kernels.w4a16 import _moe_common, check_int4, check_moe

from .fp8 import weight_dequant_torch


def dequant_int4_torch(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[.., N, K/8] codes -> [.., N, K] fp32 (u - z) * s, written here apart from the engine's int4.py."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    u = ((qweight[..., None] >> shifts) & 0xF).flatten(-2).float()  # [.., N, K]
    g = u.shape[-1] // scales.shape[-1]
    return (u - zeros.float().repeat_interleave(g, -1)) * scales.float().repeat_interleave(g, -1)


def w4a16_gemm_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor(x, "x", ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32), last_contiguous=True)
    check_int4(qweight, scales, zeros, x.shape[1], x.device)
    o = out_or_new(out, (x.shape[0], qweight.shape[0]), x.dtype, x.device)
    o.copy_(F.linear(x.float(), dequant_int4_torch(qweight, scales, zeros)))
    return o


def w4a16_moe_gemm_torch(
    x: torch.Tensor, expert_offsets: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor, activation: str | None = None, *, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    o, swiglu, order, gk, _ = check_moe(x, expert_offsets, qweight, scales, zeros, activation, out, gather)
    if order is not None:  # sorted row r is token order[r] // k
        x = x[order.long() // gk]
    offsets = expert_offsets.tolist()
    for e in range(qweight.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        y = F.linear(x[lo:hi].float(), dequant_int4_torch(qweight[e], scales[e], zeros[e]))  # [rows, N]
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        o[lo:hi] = y.to(o.dtype)
    return o


def _dequant_fp8(w: torch.Tensor, scale: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """One [N, K] e4m3 weight in fp32; with swiglu the gate and up halves carry their own scale blocks."""
    if not swiglu:
        return weight_dequant_torch(w, scale)
    half, rows = w.shape[0] // 2, scale.shape[0] // 2
    return torch.cat((weight_dequant_torch(w[:half], scale[:rows]), weight_dequant_torch(w[half:], scale[rows:])))


def w8a16_gemm_torch(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor(x, "x", ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32), last_contiguous=True)
    o = out_or_new(out, (x.shape[0], w.shape[0]), x.dtype, x.device)
    o.copy_(F.linear(x.float(), _dequant_fp8(w, w_scale, False)))
    return o


def w8a16_moe_gemm_torch(
    x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    activation: str | None = None, *, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    o, swiglu, order, gk = _moe_common(x, expert_offsets, w.shape[0], w.shape[1], activation, out, gather)
    if order is not None:
        x = x[order.long() // gk]
    offsets = expert_offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        y = F.linear(x[lo:hi].float(), _dequant_fp8(w[e], w_scale[e], swiglu))
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        o[lo:hi] = y.to(o.dtype)
    return o
