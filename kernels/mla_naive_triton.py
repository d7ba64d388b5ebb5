"""Triton kernel: causal attention of prefill chunks over K and V expanded per head from the latent (the naive MLA
form); see kernels/mla_naive.py for the checked wrapper."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.util import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def mla_prefill_naive_kernel(
    q_ptr, k_ptr, kpe_ptr, v_ptr, o_ptr, seq_lens_ptr, qsl_ptr, ksl_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_ps, stride_vs, stride_vh, stride_ot, stride_oh,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (query tile, sequence b, head h). Query token i of b sits at position seq_len - q_len + i and sees
    context positions 0..itself; the context's keys are rows ksl[b].. of k / k_pe / v."""
    tile, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q0
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    k0 = tl.load(ksl_ptr + b).to(tl.int64)
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qmask = i < q_len
    q_pos = seq_len - q_len + i
    offs_d, offs_r, offs_v = tl.arange(0, D_NOPE), tl.arange(0, D_ROPE), tl.arange(0, D_V)
    qrow = (q0 + i).to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_ptr + qrow[:, None] + offs_d[None, :], mask=qmask[:, None], other=0.0)
    qpe = tl.load(q_ptr + qrow[:, None] + D_NOPE + offs_r[None, :], mask=qmask[:, None], other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is not exact: fp32 operands there
        q, qpe = q.to(tl.float32), qpe.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_V), tl.float32)
    kv_end = tl.minimum(seq_len - q_len + tile * BLOCK_M + BLOCK_M, seq_len)  # causal: later keys unseen
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < kv_end
        krow = k0 + pos
        k = tl.load(k_ptr + krow[:, None] * stride_ks + h * stride_kh + offs_d[None, :], mask=pmask[:, None],
                    other=0.0)
        kpe = tl.load(kpe_ptr + krow[:, None] * stride_ps + offs_r[None, :], mask=pmask[:, None], other=0.0)
        if UPCAST:
            k, kpe = k.to(tl.float32), kpe.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) + tl.dot(qpe, tl.trans(kpe), input_precision=PREC)
        visible = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: position 0 is visible to every row
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + krow[:, None] * stride_vs + h * stride_vh + offs_v[None, :], mask=pmask[:, None],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    orow = (q0 + i).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(o_ptr + orow[:, None] + offs_v[None, :], o.to(o_ptr.dtype.element_ty), mask=qmask[:, None])


def launch_mla_prefill_naive(q: torch.Tensor, k: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, seq_lens: torch.Tensor, qsl: torch.Tensor, ksl: torch.Tensor,
                             scale: float, max_q_len: int) -> None:
    """q [T, H, nope + R], k [S, H, nope], k_pe [S, R], v [S, H, v], out [T, H, v]; unit last strides."""
    heads, d_nope = k.shape[1], k.shape[2]
    bsz = seq_lens.shape[0]
    block_m = 16 if interpreting() else 64
    block_n = 16 if interpreting() else 64
    prec = "ieee" if q.dtype == torch.float32 or interpreting() else "tf32"
    grid = (triton.cdiv(max_q_len, block_m), bsz, heads)
    mla_prefill_naive_kernel[grid](
        q, k, k_pe, v, out, seq_lens, qsl, ksl, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_pe.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), D_NOPE=d_nope, D_ROPE=k_pe.shape[1], D_V=v.shape[2],
        BLOCK_M=block_m, BLOCK_N=block_n, PREC=prec, UPCAST=interpreting() and q.dtype != torch.float32,
        num_warps=4 if interpreting() else 8, num_stages=2)
