"""The reference `kernels.moe` is tested against: `moe_grouped_gemm_torch`, with the same signature as the Triton
wrapper `moe_grouped_gemm` and the same input checks (the kernel module's own), in fp32 math with one matmul per
expert that has rows (FP8 weights dequantized with `weight_dequant_torch`, x quantized with `act_quant_torch`).
The CPU path runs its own experts (`inference/model/moe.py`), not this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_mcp.kernels.moe import _check

from .fp8 import act_quant_torch, weight_dequant_torch


def _dequant(w: torch.Tensor, scale: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """One expert's [N, K] weight in fp32; with swiglu the gate and up halves carry their own scale blocks."""
    if scale is None:
        return w.float()
    if not swiglu:
        return weight_dequant_torch(w, scale)
    half, srows = w.shape[0] // 2, scale.shape[0] // 2
    return torch.cat((weight_dequant_torch(w[:half], scale[:srows]), weight_dequant_torch(w[half:], scale[srows:])))


def moe_grouped_gemm_torch(
    x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None,
    activation: str | None = None, *, scale_fmt: str | None = None, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None, x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `moe_grouped_gemm`: fp32 math, one matmul per expert with rows (FP8: x through act_quant_torch)."""
    o, swiglu, order, gk = _check(x, expert_offsets, w, w_scale, activation, out, gather, x_scale)
    if order is not None:  # row r of the sorted rows is token order[r] // k
        src = order.long() // gk
        x, x_scale = x[src], None if x_scale is None else x_scale[src]
    fp8 = w_scale is not None
    if fp8:
        xq, xs = (x, x_scale) if x_scale is not None else act_quant_torch(x, 128, scale_fmt)
        xf = xq.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]  # [M, K] dequantized
    else:
        xf = x.to(w.dtype).float()  # the kernel multiplies in w's dtype
    offsets = expert_offsets.tolist()
    for e in range(w.shape[0]):
        r0, r1 = offsets[e], offsets[e + 1]
        if r1 <= r0:
            continue  # experts with no rows cost nothing
        y = xf[r0:r1] @ _dequant(w[e], w_scale[e] if fp8 else None, swiglu).T  # [rows, N]
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        o[r0:r1] = y.to(o.dtype)
    return o
