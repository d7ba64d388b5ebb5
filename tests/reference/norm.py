"""The references `kernels.norm` is tested against: `rmsnorm_torch` and `rmsnorm_residual_torch`, each with the same
signature as its Triton wrapper (`rmsnorm`, `rmsnorm_residual`) and the same input checks (the kernel module's
own): RMSNorm in fp32 (cast to x's dtype before the weight), then, with quant=True, `act_quant_torch` of the
output. The CPU path runs its own RMSNorm (`inference/model/layers.py`), not these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_mcp.kernels.fp8 import BLOCK, _check_scale_fmt
from deepseek_mcp.kernels.norm import Out, Result, _check, _out_len, _quant_outs
from deepseek_mcp.kernels.util import out_or_new

from .fp8 import act_quant_torch


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: Out = None, quant: bool = False,
                  scale_fmt: str | None = None) -> Result:
    """Twin of `rmsnorm`: rmsnorm, then act_quant_torch of y with quant."""
    _check(x, weight, None)
    ue8m0 = _check_scale_fmt(scale_fmt)
    y = weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    if not quant:
        return y if out is None else out_or_new(out, x.shape, x.dtype, x.device).copy_(y)
    _out_len(out, 3)
    y = y if out is None else out_or_new(out[0], x.shape, x.dtype, x.device, "out[0]").copy_(y)
    yq, ys = act_quant_torch(y, BLOCK, "ue8m0" if ue8m0 else None, out=_quant_outs(x, out, 1))
    return y, yq, ys


def rmsnorm_residual_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                           out: Out = None, quant: bool = False, scale_fmt: str | None = None) -> Result:
    """Twin of `rmsnorm_residual`."""
    _check(x, weight, residual)
    _check_scale_fmt(scale_fmt)
    _out_len(out, 4 if quant else 2)
    h = x + residual
    y = rmsnorm_torch(h, weight, eps)
    if out is not None:
        y = out_or_new(out[0], x.shape, x.dtype, x.device, "out[0]").copy_(y)
        h = out_or_new(out[1], x.shape, x.dtype, x.device, "out[1]").copy_(h)
    if not quant:
        return y, h
    yq, ys = act_quant_torch(y, BLOCK, scale_fmt, out=_quant_outs(x, out, 2))
    return y, h, yq, ys
