"""Triton kernels for FP8 e4m3 with 128-blocked fp32 scales: activation quantization, weight dequantization and
the block-scaled GEMM. Imported only when a Triton path runs (see kernels/fp8.py for the checked wrappers).

The e4m3 rounding is done in integer arithmetic (round to nearest even, saturated at +-448) before the cast, so
the cast is exact on every backend: Triton's CPU interpreter rounds fp32 -> fp8 wrongly on its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.tuning import autotune
from deepseek_mcp.kernels.util import cdiv, device_sms, interpreting, next_pow2


@triton.jit
def _ceil_pow2(s):
    """Smallest power of two >= s for positive normal fp32 s (UE8M0 scales), exactly, from the bits."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    exp = tl.where((bits & 0x7FFFFF) != 0, exp + 1, exp)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3fn value (ties to even), still as fp32."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal e4m3 (a >= 2^-6): keep 3 of the 23 mantissa bits; the carry may bump the exponent, as it should
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # mask 0xFFF00000
    # subnormal e4m3 (a < 2^-6): integer multiples of 2^-9, i.e. round a * 2^9 to an integer
    qb = (a * 512.0).to(tl.int32, bitcast=True)
    mant = (qb & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum(150 - (qb >> 23), 1), 30)  # value = mant * 2^-shift; >= 21 when a < 2^-6
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    sub = q.to(tl.float32) * 0.001953125  # 2^-9
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)  # sign bit, so -0.0 stays -0.0


@triton.jit
def act_quant_kernel(
    x_ptr, y_ptr, s_ptr,  # x [M, K] float, y [M, K] e4m3, s [M, ceil(K/GROUP)] fp32
    M, K,
    stride_xm, stride_ym, stride_sm,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, UE8M0: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * GROUP + tl.arange(0, GROUP)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_M]
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        s = _ceil_pow2(s)
    y = tl.math.div_rn(x, s[:, None])
    y = _round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + g, s, mask=rmask)


@triton.jit
def weight_dequant_kernel(
    w_ptr, s_ptr, y_ptr,  # w [N, K] e4m3, s [ceil(N/BLOCK), ceil(K/BLOCK)] fp32, y [N, K]
    N, K,
    stride_wn, stride_sn, stride_sk, stride_yn,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    scale = tl.load(s_ptr + pid_n * stride_sn + pid_k * stride_sk)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :], (w * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr,  # a [M, K] e4m3, a_s [M, Kb], b [N, K] e4m3, b_s [Nb, Kb], c [S, M, N]
    M, N, K, M_BUCKET,  # M_BUCKET (m_bucket(M)) only keys the autotuner
    stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cs, stride_cm,
    SCALE_BLOCK: tl.constexpr,  # 128: rows/cols per scale; also the K step
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """C = (A * a_s) (B * b_s)^T. Each K step of SCALE_BLOCK is one tensor-core dot whose fp32 result is scaled
    by its row and column scales and added into the fp32 accumulator. With SPLIT_K > 1, program (i, s) does
    the s-th slice of the K steps and writes its fp32 partial to c[s] (summed by splitk_reduce_kernel)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles sweep the columns together so B tiles are reused from L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, SCALE_BLOCK)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [BK, BN], K-major
    a_s_ptrs = a_s_ptr + offs_m.to(tl.int64) * stride_asm
    b_s_ptrs = b_s_ptr + (offs_n // SCALE_BLOCK) * stride_bsn

    k_steps = tl.cdiv(K, SCALE_BLOCK)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    kb_begin = pid_k * per_split
    kb_end = tl.minimum(kb_begin + per_split, k_steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_begin, kb_end):
        kmask = (kb * SCALE_BLOCK + offs_k) < K
        a = tl.load(a_ptrs + kb * SCALE_BLOCK, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs + kb * SCALE_BLOCK, mask=kmask[:, None] & nmask[None, :], other=0.0)
        sa = tl.load(a_s_ptrs + kb * stride_ask, mask=mmask, other=0.0)
        sb = tl.load(b_s_ptrs + kb * stride_bsk, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def splitk_reduce_kernel(ws_ptr, c_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """c[i] = sum_s ws[s, i] in a fixed order (deterministic), ws [SPLIT_K, M*N] fp32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _cfg(bm: int, bn: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m}, num_warps=warps, num_stages=stages)


# M <= 64 (decode, small batches): weight-bandwidth bound, narrow column tiles, split-K, many programs. Rows
# below 64 compile to mma.sync (fp8 widened to fp16, HMMA); 64 rows to Hopper wgmma (QGMMA) at no extra bytes.
SMALL_M_CONFIGS = [_cfg(16, 32, 4, 4), _cfg(16, 64, 4, 4), _cfg(16, 64, 4, 6), _cfg(16, 128, 4, 4),
                   _cfg(32, 64, 4, 4), _cfg(32, 128, 8, 4), _cfg(64, 32, 4, 4), _cfg(64, 64, 4, 4),
                   _cfg(64, 64, 4, 6), _cfg(64, 128, 8, 4)]
# M > 64: tensor-core bound (QGMMA). The per-K-step scaling keeps a dot result beside the accumulator, so a
# tile's fp32 values count twice: 128x128 on 8 warps is 224 registers; 128x256 or 256x128 spill (sm_90 ptxas).
LARGE_M_CONFIGS = [_cfg(128, 128, 8, 4), _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 5), _cfg(64, 256, 8, 4),
                   _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 5)]
SMALL_M_MAX = 64


def _prune_small(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= bucket or c.kwargs["BLOCK_M"] == 64] or configs[:1]


def m_bucket(m: int) -> int:
    """Autotuner key for M: powers of two from 16 to 8192 (batch sizes that tune alike share one entry)."""
    return min(max(16, next_pow2(m)), 8192)


_gemm_small = autotune(configs=SMALL_M_CONFIGS, key=["M_BUCKET", "N", "K", "SPLIT_K"],
                              prune_configs_by={"early_config_prune": _prune_small})(fp8_gemm_kernel)
_gemm_large = autotune(configs=LARGE_M_CONFIGS, key=["M_BUCKET", "N", "K", "SPLIT_K"])(fp8_gemm_kernel)


def split_k_for(m: int, n: int, k: int, sms: int, block: int = 128) -> int:
    """Split K while the output tiles (nominal 16-64 x 64 for small M, 128 x 128 above) leave SMs idle: up to
    2 programs per SM for small M (bandwidth bound), 1 above; each split keeps >= 4 K steps. The fp32 partials
    (split x M x N) are summed by splitk_reduce_kernel."""
    if m <= SMALL_M_MAX:
        tiles, target = cdiv(m, min(max(16, next_pow2(m)), 64)) * cdiv(n, 64), 2 * sms
    else:
        tiles, target = cdiv(m, 128) * cdiv(n, 128), sms
    k_steps, split = cdiv(k, block), 1
    while tiles * split < target and cdiv(k_steps, split * 2) >= 4:
        split *= 2
    return split


def launch_act_quant(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, group: int, ue8m0: bool) -> None:
    """x [M, K] (last dim contiguous), y [M, K] e4m3, s [M, ceil(K/group)] fp32."""
    m, k = x.shape
    block_m = 16
    grid = (cdiv(m, block_m), cdiv(k, group))
    act_quant_kernel[grid](x, y, s, m, k, x.stride(0), y.stride(0), s.stride(0),
                           GROUP=group, BLOCK_M=block_m, UE8M0=ue8m0, num_warps=4)


def launch_weight_dequant(w: torch.Tensor, s: torch.Tensor, y: torch.Tensor, block: int) -> None:
    n, k = w.shape
    grid = (cdiv(n, block), cdiv(k, block))
    weight_dequant_kernel[grid](w, s, y, n, k, w.stride(0), s.stride(0), s.stride(1), y.stride(0),
                                BLOCK=block, num_warps=8)


def launch_fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, c: torch.Tensor,
    config: dict | None = None,
) -> None:
    """c [M, N] (contiguous) = block-scaled a @ b^T. `config` (tests) fixes BLOCK_M, BLOCK_N, SPLIT_K, num_warps,
    num_stages, GROUP_M instead of the autotuner (the interpreter uses a fixed small config)."""
    m, k = a.shape
    n = b.shape[0]
    bucket = m_bucket(m)
    if config is not None:
        cfg = dict(config)
        split = int(cfg.pop("SPLIT_K", 1))
        cfg.setdefault("GROUP_M", 8)
        cfg.setdefault("num_warps", 4)
        cfg.setdefault("num_stages", 2)
        kernel = fp8_gemm_kernel
    else:
        split = split_k_for(m, n, k, device_sms(a.device))
        if interpreting():
            cfg = {"BLOCK_M": 16 if m <= SMALL_M_MAX else 32, "BLOCK_N": 32, "GROUP_M": 8}
            kernel = fp8_gemm_kernel
        else:
            cfg = {}
            kernel = _gemm_small if m <= SMALL_M_MAX else _gemm_large
    target = c if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=c.device)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)

    kernel[grid](a, a_s, b, b_s, target, m, n, k, bucket,
                 a.stride(0), a_s.stride(0), a_s.stride(1), b.stride(0), b_s.stride(0), b_s.stride(1),
                 target.stride(0) if split > 1 else 0, n, SCALE_BLOCK=128, SPLIT_K=split, **cfg)
    if split > 1:
        block = 1024
        splitk_reduce_kernel[(cdiv(m * n, block),)](target, c, m * n, SPLIT_K=split, BLOCK=block, num_warps=4)
