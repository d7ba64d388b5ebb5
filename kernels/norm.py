"""RMSNorm with the residual add fused in front: `rmsnorm` / `rmsnorm_residual` (Triton, kernels/norm_triton.py,
imported on first use) and their twins `*_torch`.

y = weight * cast(x * rsqrt(mean(x^2) + eps)), normalized in fp32 and cast to x's dtype before the weight (as
DeepSeek's and transformers' references do). With a residual: h = x + residual (rounded to x's dtype, as a
separate add would be), returns (rmsnorm(h), h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.util import check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _triton():
    from kernels import norm_triton

    return norm_triton


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    check_tensor(weight, "weight", shape=(x.shape[1],), dtypes=_FLOATS, device=x.device)
    if residual is not None:
        check_tensor(residual, "residual", shape=tuple(x.shape), dtypes=(x.dtype,), device=x.device,
                     last_contiguous=True)


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Twin of `rmsnorm`."""
    _check(x, weight, None)
    y = weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return y if out is None else out_or_new(out, x.shape, x.dtype, x.device).copy_(y)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, D] -> [M, D] in x's dtype, one program per row."""
    _check(x, weight, None)
    check_launchable(x.device, "rmsnorm")
    y = out_or_new(out, x.shape, x.dtype, x.device)
    if x.numel():
        _triton().launch_rmsnorm(x, None, weight, eps, y, None)
    return y


def rmsnorm_residual_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `rmsnorm_residual`."""
    _check(x, weight, residual)
    h = x + residual
    y = rmsnorm_torch(h, weight, eps)
    if out is None:
        return y, h
    return out_or_new(out[0], x.shape, x.dtype, x.device).copy_(y), out_or_new(out[1], x.shape, x.dtype,
                                                                               x.device).copy_(h)


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, D] -> (rmsnorm(x + residual) [M, D], x + residual [M, D]) in one kernel."""
    _check(x, weight, residual)
    check_launchable(x.device, "rmsnorm_residual")
    y = out_or_new(None if out is None else out[0], x.shape, x.dtype, x.device, "out[0]")
    h = out_or_new(None if out is None else out[1], x.shape, x.dtype, x.device, "out[1]")
    if x.numel():
        _triton().launch_rmsnorm(x, residual, weight, eps, y, h)
    return y, h
