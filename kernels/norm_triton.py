"""Triton kernels for RMSNorm, optionally with the residual add fused in front and the FP8 quantization of the
output fused behind (see kernels/norm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.fp8_triton import _ceil_pow2, _round_e4m3
from deepseek_mcp.kernels.util import cdiv, next_pow2

QUANT_GROUP = 128  # act_quant's 1 x 128 groups


@triton.jit
def rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr,  # x, res, y, res_out [M, D]; w [D]
    yq_ptr, ys_ptr,  # with QUANT: y as e4m3 [M, D] and its fp32 scales [M, ceil(D / COLS)]
    D, eps,
    stride_x, stride_r, stride_y, stride_ro, stride_q, stride_s,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, UE8M0: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """One row per program, held as [ROWS, COLS] (element r * COLS + c; COLS = 128: the 1 x 128 quantization
    groups, the same layout with and without QUANT so y does not depend on it); with QUANT, y quantized as
    act_quant does from the y stored."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # h = x + residual, rounded to the activation dtype as a separate add would
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / D + eps)
    normed = (xf * inv).to(y_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight, as the reference
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (normed * w).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    if QUANT:  # scale = max(amax, 1e-4) / 448 per group (UE8M0: up to a power of two), e4m3 round to nearest
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        amax = tl.max(tl.abs(yf), axis=1)  # [ROWS]
        s = tl.math.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, 448.0, tl.float32))
        if UE8M0:
            s = _ceil_pow2(s)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(yf, s[:, None]), -448.0), 448.0))
        tl.store(yq_ptr + row * stride_q + offs, q.to(yq_ptr.dtype.element_ty), mask=mask)
        groups = tl.arange(0, ROWS)
        tl.store(ys_ptr + row * stride_s + groups, s, mask=groups * COLS < D)


def launch_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
                   y: torch.Tensor, res_out: torch.Tensor | None,
                   quant: tuple[torch.Tensor, torch.Tensor] | None = None, ue8m0: bool = False) -> None:
    """x, residual, y, res_out [M, D] with unit last stride; w [D]; quant: (yq [M, D] e4m3, ys [M, ceil(D/128)]
    fp32) to write y quantized per 1 x 128 group too."""
    m, d = x.shape
    has_res = residual is not None
    r = residual if has_res else x
    ro = res_out if has_res else y
    yq, ys = quant if quant is not None else (y, y)
    rows, cols = next_pow2(cdiv(d, QUANT_GROUP)), QUANT_GROUP
    rmsnorm_kernel[(m,)](x, r, w, y, ro, yq, ys, d, float(eps), x.stride(0), r.stride(0), y.stride(0),
                         ro.stride(0), yq.stride(0), ys.stride(0), HAS_RESIDUAL=has_res, QUANT=quant is not None,
                         UE8M0=ue8m0, ROWS=rows, COLS=cols, num_warps=8 if rows * cols >= 4096 else 4)
