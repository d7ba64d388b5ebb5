"""Triton kernel: rope on q_pe and k_pe, RMSNorm of the latent, both written into the paged cache slot
(see kernels/rope.py for the checked wrapper)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.util import next_pow2


@triton.jit
def _rotate(x_ptr, c, s, offs_i, imask, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Load the pairs of one rope vector at x_ptr and rotate them -> (out1, out2) in fp32."""
    if INTERLEAVE:  # pairs (x0, x1), (x2, x3), ...
        i1, i2 = 2 * offs_i, 2 * offs_i + 1
    else:  # halves
        i1, i2 = offs_i, offs_i + HALF
    x1 = tl.load(x_ptr + i1, mask=imask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + i2, mask=imask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s, i1, i2


@triton.jit
def rope_kv_cache_kernel(
    kv_ptr, w_ptr, qpe_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, qout_ptr,
    C, H, eps,
    stride_kv, stride_qt, stride_qh, stride_cs, stride_slot, stride_ot, stride_oh,
    HALF: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """One token per program: cache[slot] = (rmsnorm(c_kv) [C], rope(k_pe) [R]); q_out = rope(q_pe) [H, R]."""
    t = tl.program_id(0).to(tl.int64)
    act = qout_ptr.dtype.element_ty
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x = tl.load(kv_ptr + t * stride_kv + offs_c, mask=cmask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    c_kv = ((x * inv).to(act).to(tl.float32) * w).to(act)  # cast before the weight, as the reference
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)  # < 0: a padding row (CUDA graphs), nothing written
    n_keep = tl.where(slot >= 0, C, 0)  # columns to write: all, or none for a padding row
    row = cache_ptr + tl.maximum(slot, 0) * stride_cs
    tl.store(row + offs_c, c_kv.to(cache_ptr.dtype.element_ty), mask=offs_c < n_keep)
    offs_i = tl.arange(0, BLOCK_I)
    imask = offs_i < HALF
    ikeep = offs_i < tl.where(slot >= 0, HALF, 0)
    c = tl.load(cos_ptr + t * HALF + offs_i, mask=imask, other=0.0)
    s = tl.load(sin_ptr + t * HALF + offs_i, mask=imask, other=0.0)
    o1, o2, i1, i2 = _rotate(kv_ptr + t * stride_kv + C, c, s, offs_i, imask, HALF, INTERLEAVE)
    tl.store(row + C + i1, o1.to(act).to(cache_ptr.dtype.element_ty), mask=ikeep)
    tl.store(row + C + i2, o2.to(act).to(cache_ptr.dtype.element_ty), mask=ikeep)
    for h in range(H):
        o1, o2, i1, i2 = _rotate(qpe_ptr + t * stride_qt + h * stride_qh, c, s, offs_i, imask, HALF, INTERLEAVE)
        out = qout_ptr + t * stride_ot + h * stride_oh
        tl.store(out + i1, o1.to(act), mask=imask)
        tl.store(out + i2, o2.to(act), mask=imask)


def launch_rope_kv_cache(kv: torch.Tensor, weight: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor, q_out: torch.Tensor,
                         eps: float, interleave: bool) -> None:
    """kv [T, C + R], q_pe [T, H, R], cos/sin [T, R/2] fp32 contiguous, slots [T], cache [S, C + R], q_out [T, H, R]."""
    t, h, r = q_pe.shape
    c = kv.shape[1] - r
    rope_kv_cache_kernel[(t,)](kv, weight, q_pe, cos, sin, slots, cache, q_out, c, h, float(eps),
                               kv.stride(0), q_pe.stride(0), q_pe.stride(1), cache.stride(0), slots.stride(0),
                               q_out.stride(0), q_out.stride(1), HALF=r // 2, INTERLEAVE=interleave,
                               BLOCK_C=next_pow2(c), BLOCK_I=next_pow2(r // 2), num_warps=4)
