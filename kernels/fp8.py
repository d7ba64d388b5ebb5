"""FP8 e4m3 block-scaled weights and activations (DeepSeek-V3 checkpoint format).

Weights are stored as e4m3 with one fp32 `weight_scale_inv` per 128x128 block; edge blocks (N or K not a
multiple of 128) are partial. Dequantization is `w.float() * scale` block by block. Activations are quantized
per 1x128 group along the last dim: scale = max(amax, 1e-4) / 448 (rounded up to a power of two for UE8M0).

Each operation has a Triton wrapper (`act_quant`, `weight_dequant`, `fp8_gemm`, `fp8_linear`; kernels in
kernels/fp8_triton.py, imported on first use). The pure-torch references they are tested against, `*_torch` with
the same signatures, live in tests/reference/fp8.py (the served code calls none of them).
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import FP8_DTYPE, cdiv, check_launchable, check_tensor, out_or_new

BLOCK = 128  # the checkpoint's scale block; fp8_gemm's K step
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton():
    from deepseek_mcp.kernels import fp8_triton

    return fp8_triton


def _check_scale_fmt(scale_fmt: str | None) -> bool:
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    return scale_fmt == "ue8m0"


# ----------------------------------------------------------------------------------------------- act_quant


def _act_quant_check(x: torch.Tensor, block_size: int, scale_fmt: str | None, out) -> tuple:
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    ue8m0 = _check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    s_shape = (*x.shape[:-1], cdiv(k, block_size))
    if out is None:
        y = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        s = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    else:
        y = out_or_new(out[0], x.shape, FP8_DTYPE, x.device, "out[0]")
        s = out_or_new(out[1], s_shape, torch.float32, x.device, "out[1]")
    return y, s, ue8m0


def act_quant(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None, *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per 1 x block_size group along the last dim -> (e4m3 [..., K], fp32 [..., Kb])."""
    y, s, ue8m0 = _act_quant_check(x, block_size, scale_fmt, out)
    check_launchable(x.device, "act_quant")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0]:
        _triton().launch_act_quant(x2, y.view(-1, k), s.view(-1, s.shape[-1]), block_size, ue8m0)
    return y, s


# ------------------------------------------------------------------------------------------ weight_dequant


def _dequant_check(w, scale_inv, block_size, dtype, out) -> torch.Tensor:
    check_tensor(w, "w", ndim=2, dtypes=(FP8_DTYPE,))
    n, k = w.shape
    nb, kb = cdiv(n, block_size), cdiv(k, block_size)
    if tuple(scale_inv.shape) != (nb, kb):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} "
                         f"with {block_size}x{block_size} blocks (expected {(nb, kb)})")
    return out_or_new(out, (n, k), dtype, w.device)


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """w [N, K] e4m3 times its per-block scales -> [N, K] dtype (one program per block)."""
    y = _dequant_check(w, scale_inv, block_size, dtype, out)
    check_tensor(scale_inv, "scale_inv", dtypes=(torch.float32,), device=w.device)
    check_launchable(w.device, "weight_dequant")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if w.numel():
        _triton().launch_weight_dequant(w if w.stride(-1) == 1 else w.contiguous(), scale_inv, y, block_size)
    return y


# ----------------------------------------------------------------------------------------------- fp8_gemm


def _gemm_check(a, a_scale, b, b_scale, out) -> torch.Tensor:
    check_tensor(a, "a", ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor(b, "b", ndim=2, dtypes=(FP8_DTYPE,), device=a.device)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a [M, K] = {tuple(a.shape)} and b [N, K] = {tuple(b.shape)} disagree on K")
    kb = cdiv(k, BLOCK)
    check_tensor(a_scale, "a_scale", shape=(m, kb), dtypes=(torch.float32,), device=a.device)
    check_tensor(b_scale, "b_scale", shape=(cdiv(n, BLOCK), kb), dtypes=(torch.float32,), device=a.device)
    if out is not None:
        check_tensor(out, "out", dtypes=_OUT_DTYPES)
        return out_or_new(out, (m, n), out.dtype, a.device)
    return torch.empty((m, n), dtype=torch.bfloat16, device=a.device)


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a [M, K] e4m3 with a_scale [M, ceil(K/128)] (1x128 groups), b [N, K] e4m3 with b_scale
    [ceil(N/128), ceil(K/128)] (128x128 blocks) -> a_deq @ b_deq^T [M, N] (bf16 unless `out` says otherwise),
    accumulated in fp32 with the scales applied per 128-wide K step."""
    c = _gemm_check(a, a_scale, b, b_scale, out)
    check_launchable(a.device, "fp8_gemm")
    if c.numel() == 0:
        return c
    if a.shape[1] == 0:
        return c.zero_()
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    _triton().launch_fp8_gemm(a, a_scale, b, b_scale, c)
    return c


# --------------------------------------------------------------------------------------------- fp8_linear


def _linear_out(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    check_tensor(x, "x", dtypes=_FLOAT_DTYPES)
    check_tensor(w, "w", ndim=2, dtypes=(FP8_DTYPE,), device=x.device)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x [..., K] = {tuple(x.shape)} and w [N, K] = {tuple(w.shape)} disagree on K")
    if out is None:
        return None
    check_tensor(out, "out", shape=(*x.shape[:-1], w.shape[0]), dtypes=_OUT_DTYPES, device=x.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out.view(-1, w.shape[0])


def fp8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, scale_fmt: str | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T for x [..., K] (bf16/fp16/fp32) and an e4m3 weight w [N, K] with 128x128 block scales:
    quantize x per 1x128 group (act_quant with scale_fmt), then fp8_gemm -> [..., N] bf16 (or out's dtype)."""
    out2 = _linear_out(x, w, out)
    xq, xs = act_quant(x.reshape(-1, x.shape[-1]), BLOCK, scale_fmt)
    y = fp8_gemm(xq, xs, w, w_scale, out=out2)
    return y.view(*x.shape[:-1], w.shape[0])
