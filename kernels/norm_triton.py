"""Triton kernels for RMSNorm, optionally with the residual add fused in front (see kernels/norm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.util import next_pow2


@triton.jit
def rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr,  # x, res, y, res_out [M, D]; w [D]
    D, eps,
    stride_x, stride_r, stride_y, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # h = x + residual, rounded to the activation dtype as a separate add would
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * inv).to(y_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight, as the reference
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def launch_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
                   y: torch.Tensor, res_out: torch.Tensor | None) -> None:
    """x, residual, y, res_out [M, D] with unit last stride; w [D]."""
    m, d = x.shape
    has_res = residual is not None
    r = residual if has_res else x
    ro = res_out if has_res else y
    block = next_pow2(d)
    rmsnorm_kernel[(m,)](x, r, w, y, ro, d, float(eps), x.stride(0), r.stride(0), y.stride(0), ro.stride(0),
                         HAS_RESIDUAL=has_res, BLOCK_D=block, num_warps=8 if block >= 4096 else 4)
