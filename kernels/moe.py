"""Grouped GEMM over the routed experts: one launch for every expert's rows.

x [M, K] has its rows sorted by expert; expert e owns rows expert_offsets[e]:expert_offsets[e+1] (offsets[0] = 0,
offsets[E] = M). Weights w [E, N, K] are e4m3 with w_scale [E, ceil(N/128), ceil(K/128)] (fp32 per 128x128
block; x is then quantized per 1x128 group like act_quant) or bf16/fp16/fp32 with w_scale None.
activation None -> x @ w[e]^T [M, N]; "swiglu" -> w is the fused [E, 2I, K] gate+up weight (gate rows first) and
the result is silu(x @ gate^T) * (x @ up^T) [M, I]. Its FP8 scales are gate's blocks then up's blocks,
[E, 2 * ceil(I/128), ceil(K/128)], i.e. torch.cat((gate_scale_inv, up_scale_inv), dim=1) of the checkpoint
(the same as the fused matrix's own blocks when 128 divides I, as in DeepSeek-V3 with I = 2048).

With gather=(order, k) the kernel reads x [T, K] per token (sorted row r is token order[r] // k), so the
sorted copy of x is never made; with x_scale, x comes already e4m3 (quantized by the RMSNorm before it).

`moe_grouped_gemm` launches the Triton kernel (kernels/moe_triton.py, imported on first use). The reference it is
tested against, `moe_grouped_gemm_torch` (same signature; one fp32 matmul per expert that has rows), is in
tests/reference/moe.py.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.fp8 import act_quant
from deepseek_mcp.kernels.util import FP8_DTYPE, cdiv, check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _triton():
    from deepseek_mcp.kernels import moe_triton

    return moe_triton


def _check(x, expert_offsets, w, w_scale, activation, out, gather, x_scale
           ) -> tuple[torch.Tensor, bool, torch.Tensor | None, int]:
    """-> (output [M, N_OUT], swiglu, gather's order or None, gather's k)."""
    quantized = x_scale is not None  # x comes e4m3, read as is by the kernel
    check_tensor(x, "x", ndim=2, dtypes=(FP8_DTYPE,) if quantized else _FLOATS, last_contiguous=quantized)
    check_tensor(w, "w", ndim=3, dtypes=(FP8_DTYPE, *_FLOATS), device=x.device, last_contiguous=True)
    m, k = x.shape
    n_experts, n, wk = w.shape
    if wk != k:
        raise ValueError(f"x [M, K] = {tuple(x.shape)} and w [E, N, K] = {tuple(w.shape)} disagree on K")
    check_tensor(expert_offsets, "expert_offsets", shape=(n_experts + 1,), dtypes=(torch.int32, torch.int64),
                 device=x.device)
    if activation not in (None, "swiglu"):
        raise ValueError(f"activation must be None or 'swiglu', got {activation!r}")
    swiglu = activation == "swiglu"
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs the fused [E, 2I, K] gate+up weight, got N = {n}")
    n_out = n // 2 if swiglu else n
    if w.dtype == FP8_DTYPE:
        if w_scale is None:
            raise ValueError("w is float8_e4m3fn: w_scale [E, ceil(N/128), ceil(K/128)] fp32 is required")
        rows = 2 * cdiv(n_out, 128) if swiglu else cdiv(n, 128)
        check_tensor(w_scale, "w_scale", shape=(n_experts, rows, cdiv(k, 128)), dtypes=(torch.float32,),
                     device=x.device)
    elif w_scale is not None:
        raise ValueError(f"w_scale is only for float8_e4m3fn weights, w is {w.dtype}")
    dtype = x.dtype
    if quantized:
        if w.dtype != FP8_DTYPE:
            raise ValueError(f"x_scale (x already e4m3) needs float8_e4m3fn weights, w is {w.dtype}")
        check_tensor(x_scale, "x_scale", shape=(m, cdiv(k, 128)), dtypes=(torch.float32,), device=x.device,
                     last_contiguous=True)
        dtype = out.dtype if isinstance(out, torch.Tensor) and out.dtype in _FLOATS else torch.bfloat16
    order, gk = None, 1
    if gather is not None:
        if not isinstance(gather, tuple) or len(gather) != 2:
            raise ValueError("gather must be a tuple (order [M] int32/int64, k)")
        order, gk = gather
        if isinstance(gk, bool) or not isinstance(gk, int) or gk < 1:
            raise ValueError(f"gather's k must be a positive int, got {gk!r}")
        check_tensor(order, "gather's order", shape=(m * gk,), dtypes=(torch.int32, torch.int64), device=x.device)
        m = m * gk  # x holds one row per token, the output one per (token, expert) pair
    return out_or_new(out, (m, n_out), dtype, x.device), swiglu, order, gk


def moe_grouped_gemm(
    x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None,
    activation: str | None = None, *, scale_fmt: str | None = None, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None, x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of x sorted by expert -> [M, N] (or [M, I] with "swiglu") in x's dtype, one launch for all experts.
    FP8 weights: x is quantized per 1x128 group (act_quant, `scale_fmt` None or "ue8m0") and both scales are
    applied per 128-wide K step in fp32. Other weights: x is cast to w's dtype, fp32 accumulation.

    gather=(order, k): x is [T, K], one row per token, and sorted row r reads x[order[r] // k] in the kernel
    (order [T*k] from moe_align / a stable sort of the pairs; M = T*k). x_scale [rows of x, ceil(K/128)] fp32:
    x is already e4m3 per 1x128 group (FP8 weights only), act_quant is skipped and scale_fmt unused; the
    output is then out's dtype, or bf16 without out."""
    o, swiglu, order, gk = _check(x, expert_offsets, w, w_scale, activation, out, gather, x_scale)
    check_launchable(x.device, "moe_grouped_gemm")
    if o.numel() == 0:
        return o
    if x.shape[1] == 0:
        return o.zero_()
    if x_scale is not None:
        xq, xs = x, x_scale
    elif w_scale is not None:
        xq, xs = act_quant(x, 128, scale_fmt)  # [T or M, K]: with gather, each token once
    else:
        xq, xs = x.to(w.dtype), None
        xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    _triton().launch_moe_grouped_gemm(xq, xs, w, w_scale, expert_offsets, o, swiglu,
                                      gather=None if order is None else (order, gk))
    return o
