"""Triton kernels of the MoE gate GEMM, routing and combine (see kernels/router.py for the checked wrappers)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.util import cdiv, next_pow2

# router_gemm tiles over experts and K (tokens: gemm_block_t); fp32 operands at ieee precision, no tensor cores
GEMM_BLOCK_E = 64
GEMM_BLOCK_K = 64
GEMM_MIN_STEPS = 4  # K steps per split at least (256 columns: 64 KB of the weight per program)


@triton.jit
def router_gemm_kernel(
    x_ptr, w_ptr, p_ptr,  # x [T, D] float, w [E, D] fp32, partial logits p [S, T, E] fp32
    T, E, D, STEPS,  # STEPS: K steps (of BLOCK_K) per split
    stride_x, stride_w, stride_ps, stride_pt,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """p[s] = x[:, ks] @ w[:, ks]^T over split s's K range ks, fp32 multiply-accumulate at full precision (the
    routing hangs on small differences of the logits, so no tf32); x is upcast in registers."""
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    tmask = offs_t < T
    emask = offs_e < E
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_k[None, :]  # [BT, BK]
    w_ptrs = w_ptr + offs_e.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BK, BE], K-major
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_begin = pid_s * STEPS * BLOCK_K
    k_end = tl.minimum(k_begin + STEPS * BLOCK_K, D)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kmask = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs + k0, mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k0, mask=kmask[:, None] & emask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    p_ptrs = p_ptr + pid_s * stride_ps + offs_t.to(tl.int64)[:, None] * stride_pt + offs_e[None, :]
    tl.store(p_ptrs, acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def moe_route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,  # logits [S, T, E] fp32 partials, bias [E], w [T, K] fp32, ids [T, K] i64
    S, stride_ls, stride_l, stride_w, stride_i,
    scaling,
    E: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per program: the logits summed over the S partial slices in order (deterministic; S=1 reads
    them as they are), sigmoid scores, bias for selection only, group-limited top-k (unselected groups
    at -inf), weights from the unbiased scores, normalized and scaled. Ties go to the lower expert id."""
    t = tl.program_id(0).to(tl.int64)
    EG: tl.constexpr = E // N_GROUP
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    valid = (g < N_GROUP) & (j < EG)
    flat = g * EG + j  # [BLOCK_G, BLOCK_EG] expert id
    x = tl.load(logits_ptr + t * stride_l + flat, mask=valid, other=0.0).to(tl.float32)
    for s in range(1, S):
        x += tl.load(logits_ptr + s * stride_ls + t * stride_l + flat, mask=valid, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-x))
    neg = float("-inf")
    biased = tl.where(valid, scores + tl.load(bias_ptr + flat, mask=valid, other=0.0).to(tl.float32), neg)
    if N_GROUP > 1:  # group score = sum of its two best biased scores; keep the TOPK_GROUP best groups
        m1 = tl.max(biased, axis=1)  # [BLOCK_G]
        first = tl.min(tl.where(biased == m1[:, None], j, BLOCK_EG), axis=1)
        m2 = tl.max(tl.where(j == first[:, None], neg, biased), axis=1)
        gs = tl.where(tl.arange(0, BLOCK_G) < N_GROUP, m1 + m2, neg)
        keep = tl.zeros([BLOCK_G], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gs, axis=0)
            gi = tl.min(tl.where(gs == best, tl.arange(0, BLOCK_G), BLOCK_G), axis=0)
            keep = keep | (tl.arange(0, BLOCK_G) == gi)
            gs = tl.where(tl.arange(0, BLOCK_G) == gi, neg, gs)
        biased = tl.where(keep[:, None], biased, neg)
    offs_k = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for i in tl.static_range(K):
        best = tl.max(tl.max(biased, axis=1), axis=0)
        e = tl.min(tl.min(tl.where(biased == best, flat, E), axis=1), axis=0)
        s = tl.sum(tl.sum(tl.where(flat == e, scores, 0.0), axis=1), axis=0)
        weights = tl.where(offs_k == i, s, weights)
        ids = tl.where(offs_k == i, e.to(tl.int64), ids)
        biased = tl.where(flat == e, neg, biased)
    if NORM:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scaling
    kmask = offs_k < K
    if SHARED:  # column K: the shared expert, stacked as expert E, weight 1
        kmask = offs_k <= K
        weights = tl.where(offs_k == K, 1.0, weights)
        ids = tl.where(offs_k == K, E, ids)
    tl.store(w_ptr + t * stride_w + offs_k, weights, mask=kmask)
    tl.store(ids_ptr + t * stride_i + offs_k, ids, mask=kmask)


@triton.jit
def moe_combine_kernel(
    ys_ptr, w_ptr, inv_ptr, out_ptr, valid_ptr,  # ys [T*K, D] sorted by expert, w [T, K] fp32, inv [T*K],
    D, stride_y, stride_w, stride_o,  # out [T, D], valid [1] (read only with LIMIT)
    K: tl.constexpr, BLOCK_D: tl.constexpr, LIMIT: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * ys[inv[t * K + j]] in fp32: the weighted scatter-add as a gather, no atomics.
    LIMIT: rows r >= valid[0] are masked off the load (never read, so garbage there cannot leak) and add 0."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    if LIMIT:
        limit = tl.load(valid_ptr).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(inv_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * stride_w + j)
        if LIMIT:
            keep = r < limit
            cols = tl.where(keep, D, 0)  # a skipped row: no column loaded
            acc += tl.where(keep, w, 0.0) * tl.load(ys_ptr + r * stride_y + offs, mask=offs < cols,
                                                    other=0.0).to(tl.float32)
        else:
            acc += w * tl.load(ys_ptr + r * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_block_t(t: int) -> int:
    return min(max(16, next_pow2(t)), 64)  # a decode batch (<= 64 tokens) in one row tile: w read once


def router_split_k(t: int, d: int, e: int, sms: int) -> tuple[int, int]:
    """-> (S splits, K steps per split) for router_gemm. Double S while the (token, expert) tiles times S stay
    under one program per SM and each split keeps >= GEMM_MIN_STEPS K steps; then S = cdiv(steps, per split),
    so no split is empty. Decode (T <= 64, D 7168, E 256): 4 tiles x 28 splits of 4 steps = 112 programs."""
    tiles = cdiv(t, gemm_block_t(t)) * cdiv(e, GEMM_BLOCK_E)
    steps, split = max(1, cdiv(d, GEMM_BLOCK_K)), 1
    while tiles * split < sms and cdiv(steps, split * 2) >= GEMM_MIN_STEPS:
        split *= 2
    per_split = cdiv(steps, split)
    return cdiv(steps, per_split), per_split


def launch_router_gemm(x: torch.Tensor, w: torch.Tensor, split: int, per_split: int) -> torch.Tensor:
    """x [T, D], w [E, D] fp32 (unit last strides) -> partial logits [split, T, E] fp32."""
    t, d = x.shape
    e = w.shape[0]
    parts = torch.empty((split, t, e), dtype=torch.float32, device=x.device)
    block_t = gemm_block_t(t)
    grid = (cdiv(t, block_t), cdiv(e, GEMM_BLOCK_E), split)
    router_gemm_kernel[grid](x, w, parts, t, e, d, per_split, x.stride(0), w.stride(0), parts.stride(0),
                             parts.stride(1), BLOCK_T=block_t, BLOCK_E=GEMM_BLOCK_E, BLOCK_K=GEMM_BLOCK_K,
                             num_warps=4)
    return parts


def launch_moe_route(logits: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     n_group: int, topk_group: int, top_k: int, norm: bool, scaling: float, shared: bool) -> None:
    """logits [T, E] or [S, T, E] (S partial sums) fp32 with unit last stride."""
    parts = logits if logits.dim() == 3 else logits[None]
    s, t, e = parts.shape
    moe_route_kernel[(t,)](parts, bias, weights, ids, s, parts.stride(0), parts.stride(1), weights.stride(0),
                           ids.stride(0), float(scaling), E=e, N_GROUP=n_group, TOPK_GROUP=topk_group, K=top_k,
                           NORM=norm, SHARED=shared, BLOCK_G=next_pow2(n_group), BLOCK_EG=next_pow2(e // n_group),
                           BLOCK_K=next_pow2(top_k + int(shared)), num_warps=4)


def launch_moe_combine(ys: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, out: torch.Tensor,
                       valid_rows: torch.Tensor | None = None) -> None:
    """valid_rows [1] int or None (every row read)."""
    t, k = weights.shape
    d = ys.shape[1]
    block = min(1024, next_pow2(d))
    limit = inv if valid_rows is None else valid_rows  # any pointer when unused (LIMIT=False never loads it)
    moe_combine_kernel[(t, -(-d // block))](ys, weights, inv, out, limit, d, ys.stride(0), weights.stride(0),
                                            out.stride(0), K=k, BLOCK_D=block, LIMIT=valid_rows is not None,
                                            num_warps=4)
