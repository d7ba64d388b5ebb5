"""RMSNorm with the residual add fused in front: `rmsnorm` / `rmsnorm_residual` (Triton, kernels/norm_triton.py,
imported on first use). The references they are tested against, `rmsnorm_torch` / `rmsnorm_residual_torch` (same
signatures), are in tests/reference/norm.py.

y = weight * cast(x * rsqrt(mean(x^2) + eps)), normalized in fp32 and cast to x's dtype before the weight (as
DeepSeek's and transformers' references do). With a residual: h = x + residual (rounded to x's dtype, as a
separate add would be), returns (rmsnorm(h), h).

quant=True also quantizes y for the FP8 GEMM after the norm, in the same launch: per 1 x 128 group exactly as
`kernels.fp8.act_quant(y, 128, scale_fmt)` would from the y written (y is still written: the MoE gate reads
it). The outputs, and `out` when given, are then (y, yq, ys) / (y, h, yq, ys): yq [M, D] e4m3, ys [M,
ceil(D/128)] fp32.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.fp8 import BLOCK, _check_scale_fmt
from deepseek_mcp.kernels.util import FP8_DTYPE, cdiv, check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
Out = torch.Tensor | tuple[torch.Tensor, ...] | None  # the outputs returned, preallocated
Result = torch.Tensor | tuple[torch.Tensor, ...]


def _triton():
    from deepseek_mcp.kernels import norm_triton

    return norm_triton


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    check_tensor(weight, "weight", shape=(x.shape[1],), dtypes=_FLOATS, device=x.device)
    if residual is not None:
        check_tensor(residual, "residual", shape=tuple(x.shape), dtypes=(x.dtype,), device=x.device,
                     last_contiguous=True)


def _quant_outs(x: torch.Tensor, out: Out, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(yq, ys) from out[first:] or new."""
    yq = out_or_new(None if out is None else out[first], x.shape, FP8_DTYPE, x.device, f"out[{first}]")
    ys = out_or_new(None if out is None else out[first + 1], (x.shape[0], cdiv(x.shape[1], BLOCK)),
                    torch.float32, x.device, f"out[{first + 1}]")
    return yq, ys


def _out_len(out: Out, n: int) -> None:
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != n):
        raise ValueError(f"out must be a tuple of {n} tensors here (the outputs returned)")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: Out = None, quant: bool = False,
            scale_fmt: str | None = None) -> Result:
    """x [M, D] -> y [M, D] in x's dtype, one program per row; quant: (y, yq, ys) (see the module docstring;
    scale_fmt as act_quant's: None or "ue8m0")."""
    _check(x, weight, None)
    ue8m0 = _check_scale_fmt(scale_fmt)
    check_launchable(x.device, "rmsnorm")
    if not quant:
        y = out_or_new(out, x.shape, x.dtype, x.device)
        if x.numel():
            _triton().launch_rmsnorm(x, None, weight, eps, y, None)
        return y
    _out_len(out, 3)
    y = out_or_new(None if out is None else out[0], x.shape, x.dtype, x.device, "out[0]")
    yq, ys = _quant_outs(x, out, 1)
    if x.numel():
        _triton().launch_rmsnorm(x, None, weight, eps, y, None, (yq, ys), ue8m0)
    return y, yq, ys


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     out: Out = None, quant: bool = False, scale_fmt: str | None = None) -> Result:
    """x, residual [M, D] -> (rmsnorm(x + residual) [M, D], x + residual [M, D]) in one kernel; quant: (y, h,
    yq, ys) (see the module docstring)."""
    _check(x, weight, residual)
    ue8m0 = _check_scale_fmt(scale_fmt)
    check_launchable(x.device, "rmsnorm_residual")
    _out_len(out, 4 if quant else 2)
    y = out_or_new(None if out is None else out[0], x.shape, x.dtype, x.device, "out[0]")
    h = out_or_new(None if out is None else out[1], x.shape, x.dtype, x.device, "out[1]")
    q = _quant_outs(x, out, 2) if quant else None
    if x.numel():
        _triton().launch_rmsnorm(x, residual, weight, eps, y, h, q, ue8m0)
    return (y, h) if q is None else (y, h, *q)
