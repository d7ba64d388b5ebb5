"""Triton grouped GEMM for the routed experts (see kernels/moe.py for the checked wrapper).

Rows of x are sorted by expert; expert e owns rows expert_offsets[e]:expert_offsets[e+1]. Every program
rebuilds the tile schedule on the device from expert_offsets (tiles of expert e = ceil(rows_e / BLOCK_M),
numbered expert by expert), finds its expert and row tile, and computes one [BLOCK_M, BLOCK_N] output tile
with expert e's weight. Experts without rows have no tiles, so they cost nothing; the grid is an upper bound
(ceil(M / BLOCK_M) + E tiles, at most M) and programs past the last tile return at once. One launch, no sync.
With GATHER, x holds one row per token and sorted row r reads x row order[r] // GATHER_K (and its scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.tuning import autotune
from deepseek_mcp.kernels.util import cdiv, interpreting, next_pow2


@triton.jit
def moe_grouped_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, off_ptr, ord_ptr, o_ptr,  # ord_ptr: the pair of each sorted row (GATHER)
    E, N_OUT, K, M_BUCKET, UP_SROW, GATHER_K,  # M_BUCKET keys the autotuner; UP_SROW: up's first scale row
    stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsk, stride_om,
    FP8: tl.constexpr, SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[rows of e] = x[rows] @ w[e]^T, or with SWIGLU silu(x @ w[e, :N_OUT]^T) * (x @ w[e, N_OUT:]^T).
    FP8: x and w are e4m3 with 1x128 (x) and 128x128 (w) scales applied per K step in the fp32 accumulators;
    with SWIGLU the gate and up halves have their own 128-row scale blocks (up's start at row UP_SROW)."""
    pid_m = tl.program_id(0)  # fastest: row tiles of one expert reuse the same weight columns from L2
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
    x_ptrs = x_ptr + src[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_e = w_ptr + e.to(tl.int64) * stride_we
    g_ptrs = w_e + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN], K-major
    u_ptrs = w_e + (cols + N_OUT).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    ws_e = ws_ptr + e.to(tl.int64) * stride_wse
    xs_ptrs = xs_ptr + src * stride_xsm
    g_s_ptrs = ws_e + (cols // SCALE_BLOCK) * stride_wsn
    u_s_ptrs = ws_e + (UP_SROW + cols // SCALE_BLOCK) * stride_wsn  # gate's scale blocks, then up's

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + offs_k) < K
        a = tl.load(x_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g_ptrs + k0, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter cannot multiply bf16 (it sees raw uint16)
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        if FP8:
            kb = k0 // SCALE_BLOCK
            sa = tl.load(xs_ptrs + kb, mask=rmask, other=0.0)[:, None]
            sg = tl.load(g_s_ptrs + kb * stride_wsk, mask=cmask, other=0.0)[None, :]
            acc_g += tl.dot(a, g) * sa * sg
        else:
            acc_g = tl.dot(a, g, acc=acc_g, input_precision=PREC)
        if SWIGLU:
            u = tl.load(u_ptrs + k0, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            if FP8:
                su = tl.load(u_s_ptrs + kb * stride_wsk, mask=cmask, other=0.0)[None, :]
                acc_u += tl.dot(a, u) * sa * su
            else:
                acc_u = tl.dot(a, u, acc=acc_u, input_precision=PREC)
    if SWIGLU:
        acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
    o_ptrs = o_ptr + rows64[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, acc_g.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Decode: a few rows per expert, weight-bandwidth bound -> 16-row tiles (mma.sync) or 64-row (wgmma), narrow
# columns, many programs. Prefill: tens to hundreds of rows per expert -> 64/128-row tiles. SwiGLU keeps two
# accumulators: FP8 SwiGLU at 128x128 spills on sm_90 and is pruned.
CONFIGS = [_cfg(16, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(16, 32, 4, 5), _cfg(32, 64, 4, 4),
           _cfg(64, 64, 4, 4), _cfg(64, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)]


def _prune(configs, named_args, **kwargs):
    rows_per_expert = max(1, named_args["M_BUCKET"] // max(1, named_args["E"]))
    cap = max(64, next_pow2(rows_per_expert) * 2)
    heavy = kwargs.get("FP8") and kwargs.get("SWIGLU")
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap
            and not (heavy and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 8192)]
    return kept or configs[:1]


_tuned = autotune(configs=CONFIGS, key=["M_BUCKET", "N_OUT", "K", "E", "FP8", "SWIGLU", "GATHER"],
                         prune_configs_by={"early_config_prune": _prune})(moe_grouped_gemm_kernel)


def launch_moe_grouped_gemm(
    x: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
    expert_offsets: torch.Tensor, out: torch.Tensor, swiglu: bool, config: dict | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> None:
    """x [M, K] (e4m3 with x_scale [M, Kb], or w's dtype), w [E, N, K], out [M, N_OUT] (contiguous).
    gather (order [M], k): x is [T, K] and x_scale [T, Kb], sorted row r reading row order[r] // k."""
    m, k = out.shape[0], x.shape[1]
    n_experts = w.shape[0]
    n_out = out.shape[1]
    fp8 = w_scale is not None
    xs = x_scale if fp8 else x
    ws = w_scale if fp8 else w
    ws_strides = (ws.stride(0), ws.stride(1), ws.stride(2)) if fp8 else (0, 0, 0)
    kernel, cfg = _tuned, {}
    if config is not None:
        kernel, cfg = moe_grouped_gemm_kernel, {"num_warps": 4, "num_stages": 2, **config}
    elif interpreting():
        kernel, cfg = moe_grouped_gemm_kernel, {"BLOCK_M": 16, "BLOCK_N": 32}

    def grid(meta):
        return (min(cdiv(m, meta["BLOCK_M"]) + n_experts, m), cdiv(n_out, meta["BLOCK_N"]))

    up_srow = cdiv(n_out, 128) if swiglu else 0
    order, gk = gather if gather is not None else (expert_offsets, 1)
    kernel[grid](x, xs, w, ws, expert_offsets, order, out, n_experts, n_out, k, min(max(16, next_pow2(m)), 1 << 16),
                 up_srow, gk,
                 x.stride(0), xs.stride(0) if fp8 else 0, w.stride(0), w.stride(1), *ws_strides, out.stride(0),
                 FP8=fp8, SWIGLU=swiglu, GATHER=gather is not None, SCALE_BLOCK=128,
                 BLOCK_E=max(16, next_pow2(n_experts)),
                 BLOCK_K=128 if fp8 else 64, UPCAST=interpreting() and not fp8,
                 PREC="ieee" if w.dtype == torch.float32 else "tf32", **cfg)
