"""Weight-only GEMMs: activations in bf16/fp16/fp32 times 4-bit weights (W4A16) or FP8 e4m3 weights with 128x128
block scales (W8A16: FP8 checkpoints on GPUs without FP8 tensor cores, compute capability below 8.9) dequantized in
registers (kernels/w4a16_triton.py, imported on first use). No wider copy of any weight is ever written.

Weights are the engine's 4-bit form (inference/model/int4.py; every on-disk format is converted to it at load):
qweight [.., N, K/8] int32 (code j of word c = 4-bit code of column 8c + j, bits 4j), scales [.., N, K/G]
(bf16/fp16/fp32) and zeros [.., N, K/G] uint8, W[n, k] = (u[n, k] - z[n, k // G]) * s[n, k // G].

- `w4a16_gemm(x, qweight, scales, zeros)`: x [M, K] -> x @ W^T [M, N] in x's dtype (fp32 accumulation).
- `w4a16_moe_gemm(x, expert_offsets, qweight, scales, zeros, activation, gather=...)`: the grouped GEMM of
  kernels/moe.py (rows sorted by expert, one launch for all experts, "swiglu" on the fused [E, 2I, K] gate+up
  weight, token rows gathered in the kernel with gather=(order, k)) on 4-bit experts [E, N, K/8].

- `w8a16_gemm(x, w, w_scale)`, `w8a16_moe_gemm(x, expert_offsets, w, w_scale, activation, gather=...)`: the same
  kernels on e4m3 weights [.., N, K] and their fp32 block scales [.., Nb, Kb].

Their pure-torch twins with the same signatures (`*_torch`, dequantize then matmul in fp32) are in
tests/reference/w4a16.py: the CPU torch path dequantizes inside the model (`dequant_int4`), not through them.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import FP8_DTYPE, cdiv, check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
FP8_BLOCK = 128  # the FP8 checkpoints' scale block (both dimensions)


def _triton():
    from deepseek_mcp.kernels import w4a16_triton

    return w4a16_triton


def check_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, device: torch.device,
               ndim: int = 2) -> int:
    """Shapes and dtypes of a 4-bit weight [.., N, K/8] and its [.., N, K/G] scales and zeros -> G."""
    check_tensor(qweight, "qweight", ndim=ndim, dtypes=(torch.int32,), device=device)
    if not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous")
    if qweight.shape[-1] * 8 != k:
        raise ValueError(f"qweight [.., N, K/8] = {tuple(qweight.shape)} does not match K = {k}")
    check_tensor(scales, "scales", ndim=qweight.dim(), dtypes=_FLOATS, device=device)
    groups = scales.shape[-1]
    if groups == 0 or k % groups or (k // groups) % 8:
        raise ValueError(f"scales [.., N, K/G] = {tuple(scales.shape)}: K = {k} is not a whole number of groups "
                         "whose size is a multiple of 8")
    check_tensor(scales, "scales", shape=(*qweight.shape[:-1], groups))
    check_tensor(zeros, "zeros", shape=tuple(scales.shape), dtypes=(torch.uint8,), device=device)
    if not (scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("scales and zeros must be contiguous")
    return k // groups


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype; W's 4-bit codes dequantized per K step in registers."""
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    group = check_int4(qweight, scales, zeros, x.shape[1], x.device)
    o = out_or_new(out, (x.shape[0], qweight.shape[0]), x.dtype, x.device)
    check_launchable(x.device, "w4a16_gemm")
    if o.numel():
        _triton().launch_w4a16_gemm(x, qweight, scales, zeros, o, group)
    return o


def w8a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """W8A16: x [M, K] @ W^T -> [M, N] in x's dtype, W e4m3 [N, K] with fp32 128x128 block scales [ceil(N/128),
    ceil(K/128)] dequantized per K step in registers (the FP8 checkpoints' GEMM on GPUs below compute capability
    8.9, which have no FP8 tensor cores; x stays in its dtype, no act_quant)."""
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    _check_fp8(w, w_scale, x.shape[1], x.device, 2)
    o = out_or_new(out, (x.shape[0], w.shape[0]), x.dtype, x.device)
    check_launchable(x.device, "w8a16_gemm")
    if o.numel():
        _triton().launch_w4a16_gemm(x, w.view(torch.uint8), w_scale, None, o, FP8_BLOCK)
    return o


def _check_fp8(w: torch.Tensor, w_scale: torch.Tensor, k: int, device: torch.device, ndim: int,
               scale_rows: int | None = None) -> None:
    check_tensor(w, "w", ndim=ndim, dtypes=(FP8_DTYPE,), device=device)
    if not w.is_contiguous() or w.shape[-1] != k:
        raise ValueError(f"w {tuple(w.shape)} must be contiguous with K = {k} columns")
    rows = cdiv(w.shape[-2], FP8_BLOCK) if scale_rows is None else scale_rows
    check_tensor(w_scale, "w_scale", shape=(*w.shape[:-2], rows, cdiv(k, FP8_BLOCK)), dtypes=(torch.float32,),
                 device=device)
    if not w_scale.is_contiguous():
        raise ValueError("w_scale must be contiguous")


def w8a16_moe_gemm(
    x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    activation: str | None = None, *, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """W8A16 grouped GEMM: as `w4a16_moe_gemm` on e4m3 experts [E, N, K] with fp32 block scales [E, Nb, Kb]
    (with "swiglu": the fused gate+up weight, scales gate's blocks then up's, as kernels/moe.py)."""
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    n = w.shape[1] if w.dim() == 3 else 0
    swiglu = activation == "swiglu"
    _check_fp8(w, w_scale, x.shape[1], x.device, 3, 2 * cdiv(n // 2, FP8_BLOCK) if swiglu else None)
    o, swiglu, order, gk = _moe_common(x, expert_offsets, w.shape[0], n, activation, out, gather)
    check_launchable(x.device, "w8a16_moe_gemm")
    if o.numel():
        _triton().launch_w4a16_moe(x, w.view(torch.uint8), w_scale, None, expert_offsets, o, swiglu, FP8_BLOCK,
                                   gather=None if order is None else (order, gk))
    return o


def _moe_common(x, expert_offsets, n_experts: int, n: int, activation, out, gather
                ) -> tuple[torch.Tensor, bool, torch.Tensor | None, int]:
    """-> (output [M, N_OUT], swiglu, gather's order or None, gather's k)."""
    m = x.shape[0]
    check_tensor(expert_offsets, "expert_offsets", shape=(n_experts + 1,), dtypes=(torch.int32, torch.int64),
                 device=x.device)
    if activation not in (None, "swiglu"):
        raise ValueError(f"activation must be None or 'swiglu', got {activation!r}")
    swiglu = activation == "swiglu"
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs the fused [E, 2I, K] gate+up weight, got N = {n}")
    order, gk = None, 1
    if gather is not None:
        if not isinstance(gather, tuple) or len(gather) != 2:
            raise ValueError("gather must be a tuple (order [M] int32/int64, k)")
        order, gk = gather
        if isinstance(gk, bool) or not isinstance(gk, int) or gk < 1:
            raise ValueError(f"gather's k must be a positive int, got {gk!r}")
        check_tensor(order, "gather's order", shape=(m * gk,), dtypes=(torch.int32, torch.int64), device=x.device)
        m *= gk  # x holds one row per token, the output one per (token, expert) pair
    return out_or_new(out, (m, n // 2 if swiglu else n), x.dtype, x.device), swiglu, order, gk


def check_moe(x, expert_offsets, qweight, scales, zeros, activation, out, gather
              ) -> tuple[torch.Tensor, bool, torch.Tensor | None, int, int]:
    """-> (output [M, N_OUT], swiglu, gather's order or None, gather's k, group size)."""
    check_tensor(x, "x", ndim=2, dtypes=_FLOATS, last_contiguous=True)
    group = check_int4(qweight, scales, zeros, x.shape[1], x.device, ndim=3)
    o, swiglu, order, gk = _moe_common(x, expert_offsets, qweight.shape[0], qweight.shape[1], activation, out,
                                       gather)
    return o, swiglu, order, gk, group


def w4a16_moe_gemm(
    x: torch.Tensor, expert_offsets: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor, activation: str | None = None, *, out: torch.Tensor | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Rows of x sorted by expert (expert e: rows expert_offsets[e]:expert_offsets[e+1]) -> [M, N] (or [M, I]
    with "swiglu") in x's dtype, every expert in one launch. gather=(order, k): x is [T, K], sorted row r reads
    x[order[r] // k] in the kernel (M = T*k)."""
    o, swiglu, order, gk, group = check_moe(x, expert_offsets, qweight, scales, zeros, activation, out, gather)
    check_launchable(x.device, "w4a16_moe_gemm")
    if o.numel():
        _triton().launch_w4a16_moe(x, qweight, scales, zeros, expert_offsets, o, swiglu, group,
                                   gather=None if order is None else (order, gk))
    return o
