"""Triton weight-only GEMMs (see kernels/w4a16.py for the checked wrappers): 4-bit weights (W4A16), or FP8 e4m3
weights with 128x128 block scales on GPUs without FP8 tensor cores (W8A16, FP8 constexpr), dequantized in
registers, never written back to memory in any wider dtype.

Weights are the engine's 4-bit form (inference/model/int4.py): codes [.., N, K/8] int32 (code j of each word in
bits 4j), scales [.., N, K/G] (16-bit or fp32) and zero points [.., N, K/G] uint8; W[n, k] = (u - z) * s. Each
K step loads the [BLOCK_K / 8, BLOCK_N] words once per program, expands them to [BLOCK_K, BLOCK_N] codes,
subtracts the zero point and multiplies by the scale of each element's group (fp32), casts to the activation
dtype and feeds tl.dot with an fp32 accumulator.

`w4a16_gemm_kernel`: one [BLOCK_M, BLOCK_N] tile of x [M, K] @ W^T. `w4a16_moe_kernel`: the grouped GEMM of
kernels/moe_triton.py (tile schedule rebuilt from expert_offsets on the device, experts without rows cost nothing,
optional token gather, fused SwiGLU with gate rows [0, N_OUT) and up rows [N_OUT, 2 N_OUT)) on 4-bit experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.tuning import autotune
from deepseek_mcp.kernels.util import cdiv, interpreting, next_pow2


@triton.jit
def _dequant_tile(q_base, s_base, z_base, cols, srows, cmask, k0, offs_k, K, stride_qn, stride_sn,
                  GROUP: tl.constexpr, FP8: tl.constexpr):
    """[BLOCK_K, BLOCK_N] fp32 weights W^T[k0 + offs_k, cols]: from the 4-bit codes, zero points and scales
    (scale rows `srows` = cols), or (FP8, W8A16) from e4m3 weights times their GROUP x GROUP block scales (scale
    rows `srows` = the block row of each column)."""
    ks = k0 + offs_k
    kmask = ks < K
    mask = kmask[:, None] & cmask[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    g = (ks // GROUP)[:, None]
    s = tl.load(s_base + srows.to(tl.int64)[None, :] * stride_sn + g, mask=mask, other=0.0)
    if FP8:  # e4m3fn bytes decoded with integer ops: Triton has no e4m3 type below sm_89
        b = tl.load(q_base + cols64 * stride_qn + ks[:, None], mask=mask, other=0).to(tl.int32)  # [BK, BN]
        sign, e, m = b >> 7, (b >> 3) & 0xF, b & 0x7
        normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e-7) (1 + m/8)
        subnormal = m.to(tl.float32) * 0.001953125 * (1 - 2 * sign).to(tl.float32)  # m/8 * 2^-6
        return tl.where(e == 0, subnormal, normal) * s
    words = tl.load(q_base + cols64 * stride_qn + (ks // 8)[:, None], mask=mask, other=0)  # [BK, BN] int32
    u = (words >> ((ks % 8) * 4)[:, None]) & 0xF
    z = tl.load(z_base + cols64 * stride_sn + g, mask=mask, other=0)
    return (u - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)


@triton.jit
def w4a16_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W^T, W dequantized per K step in registers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs + k0, mask=rmask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        srows = cols // GROUP if FP8 else cols
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, cols, srows, cmask, k0, offs_k, K, stride_qn, stride_sn, GROUP, FP8)
        if UPCAST:  # the CPU interpreter cannot multiply bf16 (it sees raw uint16)
            a = a.to(tl.float32)
        else:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc=acc, input_precision=PREC)
    o_ptrs = o_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def w4a16_moe_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, off_ptr, ord_ptr, o_ptr,
    E, N_OUT, K, M_BUCKET, GATHER_K, UP_SROW,  # UP_SROW (FP8): up's first scale row in the fused gate+up scales
    stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_om,
    SWIGLU: tl.constexpr, GATHER: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr, BLOCK_E: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows of e] = x[rows] @ W[e]^T, or with SWIGLU silu(x @ W[e, :N_OUT]^T) * (x @ W[e, N_OUT:]^T)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < E
    starts = tl.load(off_ptr + offs_e, mask=emask, other=0)
    ends = tl.load(off_ptr + offs_e + 1, mask=emask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_E]
    tiles_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    if e >= E:
        return
    sel = offs_e == e
    tile = pid_m - tl.sum(tl.where(sel, tiles_end - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(sel, ends, 0), axis=0)
    rows = tl.sum(tl.where(sel, starts, 0), axis=0) + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    if GATHER:  # the token of each sorted row: x is read in place, never copied in sorted order
        src = tl.load(ord_ptr + rows64, mask=rmask, other=0).to(tl.int64) // GATHER_K
    else:
        src = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xm + offs_k[None, :]
    e64 = e.to(tl.int64)
    q_e, s_e, z_e = q_ptr + e64 * stride_qe, s_ptr + e64 * stride_se, z_ptr + e64 * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs + k0, mask=rmask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        srows = cols // GROUP if FP8 else cols
        g = _dequant_tile(q_e, s_e, z_e, cols, srows, cmask, k0, offs_k, K, stride_qn, stride_sn, GROUP, FP8)
        acc_g = tl.dot(a, g.to(a.dtype), acc=acc_g, input_precision=PREC)
        if SWIGLU:
            up_rows = UP_SROW + cols // GROUP if FP8 else cols + N_OUT
            u = _dequant_tile(q_e, s_e, z_e, cols + N_OUT, up_rows, cmask, k0, offs_k, K, stride_qn, stride_sn,
                              GROUP, FP8)
            acc_u = tl.dot(a, u.to(a.dtype), acc=acc_u, input_precision=PREC)
    if SWIGLU:
        acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
    o_ptrs = o_ptr + rows64[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, acc_g.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Decode is weight-bandwidth bound: 16-row tiles, many narrow column tiles; prefill: 64/128-row tiles. No config
# spills on sm_80 or sm_90a (python -m deepseek_mcp.kernels.aot --family w4a16 --all-configs --arch 80 / 90)
# once SwiGLU's two accumulators drop the tiles in SWIGLU_SPILLS.
CONFIGS = [_cfg(16, 64, 64, 4, 4), _cfg(16, 32, 128, 4, 4), _cfg(32, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 3),
           _cfg(64, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3), _cfg(128, 128, 32, 8, 3)]
SWIGLU_SPILLS = {(64, 64, 64), (64, 128, 64), (128, 128, 32)}  # (BLOCK_M, BLOCK_N, BLOCK_K)
SWIGLU_SPILLS_FP8 = SWIGLU_SPILLS | {(128, 64, 64)}  # W8A16's byte decoding: 1,160 B spilled on sm_80


def spills(cfg: triton.Config, swiglu: bool, fp8: bool = False) -> bool:
    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"])
    return swiglu and tile in (SWIGLU_SPILLS_FP8 if fp8 else SWIGLU_SPILLS)


def _prune(configs, named_args, **kwargs):
    rows = max(1, named_args["M_BUCKET"] // max(1, named_args.get("E", 1)))
    cap = max(64, next_pow2(rows) * 2)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap
            and not spills(c, bool(kwargs.get("SWIGLU")), bool(kwargs.get("FP8")))]
    return kept or configs[:1]


_tuned_dense = autotune(configs=CONFIGS, key=["N", "K", "GROUP", "FP8"])(w4a16_gemm_kernel)
_tuned_moe = autotune(configs=CONFIGS, key=["M_BUCKET", "N_OUT", "K", "E", "SWIGLU", "GATHER", "GROUP", "FP8"],
                      prune_configs_by={"early_config_prune": _prune})(w4a16_moe_kernel)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _interp_cfg(group: int) -> dict:
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16 if group % 32 else 32}


def launch_w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      out: torch.Tensor, group: int, config: dict | None = None) -> None:
    """x [M, K] (last dim contiguous), qweight [N, K/8] and scales/zeros [N, K/G] (contiguous), or (zeros None,
    W8A16) e4m3 [N, K] and fp32 scales [N/G, K/G] blocks; out [M, N]."""
    fp8 = zeros is None
    m, k = x.shape
    n = qweight.shape[0]
    kernel, cfg = _tuned_dense, {}
    if config is not None:
        kernel, cfg = w4a16_gemm_kernel, {"num_warps": 4, "num_stages": 2, **config}
    elif interpreting():
        kernel, cfg = w4a16_gemm_kernel, _interp_cfg(group)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))

    kernel[grid](x, qweight, scales, scales if fp8 else zeros, out, m, n, k, x.stride(0), qweight.stride(0),
                 scales.stride(0), out.stride(0), GROUP=group, FP8=fp8,
                 UPCAST=interpreting() and x.dtype != torch.float32,
                 PREC=_prec(x.dtype), **cfg)


def launch_w4a16_moe(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     expert_offsets: torch.Tensor, out: torch.Tensor, swiglu: bool, group: int,
                     gather: tuple[torch.Tensor, int] | None = None, config: dict | None = None) -> None:
    """x [M or T, K], qweight [E, N, K/8] and scales/zeros [E, N, K/G], or (zeros None, W8A16) e4m3 [E, N, K]
    and fp32 block scales [E, Nb, Kb] (fused gate+up: gate's blocks then up's); out [M, N_OUT] (contiguous)."""
    fp8 = zeros is None
    m, k = out.shape[0], x.shape[1]
    n_experts, n_out = qweight.shape[0], out.shape[1]
    kernel, cfg = _tuned_moe, {}
    if config is not None:
        kernel, cfg = w4a16_moe_kernel, {"num_warps": 4, "num_stages": 2, **config}
    elif interpreting():
        kernel, cfg = w4a16_moe_kernel, _interp_cfg(group)

    def grid(meta):
        return (min(cdiv(m, meta["BLOCK_M"]) + n_experts, m), cdiv(n_out, meta["BLOCK_N"]))

    order, gk = gather if gather is not None else (expert_offsets, 1)
    up_srow = cdiv(n_out, group) if fp8 and swiglu else 0
    kernel[grid](x, qweight, scales, scales if fp8 else zeros, expert_offsets, order, out, n_experts, n_out, k,
                 min(max(16, next_pow2(m)), 1 << 16), gk, up_srow,
                 x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
                 SWIGLU=swiglu, GATHER=gather is not None, GROUP=group, FP8=fp8,
                 BLOCK_E=max(16, next_pow2(n_experts)),
                 UPCAST=interpreting() and x.dtype != torch.float32, PREC=_prec(x.dtype), **cfg)
