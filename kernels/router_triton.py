"""Triton kernels of the MoE routing and combine (see kernels/router.py for the checked wrappers)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.util import next_pow2


@triton.jit
def moe_route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,  # logits [T, E] fp32, bias [E], weights [T, K] fp32, ids [T, K] int64
    stride_l, stride_w, stride_i,
    scaling,
    E: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per program: sigmoid scores, bias for selection only, group-limited top-k (unselected groups
    at -inf), weights from the unbiased scores, normalized and scaled. Ties go to the lower expert id."""
    t = tl.program_id(0).to(tl.int64)
    EG: tl.constexpr = E // N_GROUP
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    valid = (g < N_GROUP) & (j < EG)
    flat = g * EG + j  # [BLOCK_G, BLOCK_EG] expert id
    x = tl.load(logits_ptr + t * stride_l + flat, mask=valid, other=0.0).to(tl.float32)
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
    ys_ptr, w_ptr, inv_ptr, out_ptr,  # ys [T*K, D] sorted by expert, w [T, K] fp32, inv [T*K], out [T, D]
    D, stride_y, stride_w, stride_o,
    K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * ys[inv[t * K + j]] in fp32: the weighted scatter-add as a gather, no atomics."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(inv_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * stride_w + j)
        acc += w * tl.load(ys_ptr + r * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_moe_route(logits: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     n_group: int, topk_group: int, top_k: int, norm: bool, scaling: float, shared: bool) -> None:
    t, e = logits.shape
    moe_route_kernel[(t,)](logits, bias, weights, ids, logits.stride(0), weights.stride(0), ids.stride(0),
                           float(scaling), E=e, N_GROUP=n_group, TOPK_GROUP=topk_group, K=top_k, NORM=norm,
                           SHARED=shared, BLOCK_G=next_pow2(n_group), BLOCK_EG=next_pow2(e // n_group),
                           BLOCK_K=next_pow2(top_k + int(shared)), num_warps=4)


def launch_moe_combine(ys: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, out: torch.Tensor) -> None:
    t, k = weights.shape
    d = ys.shape[1]
    block = min(1024, next_pow2(d))
    moe_combine_kernel[(t, -(-d // block))](ys, weights, inv, out, d, ys.stride(0), weights.stride(0),
                                            out.stride(0), K=k, BLOCK_D=block, num_warps=4)
