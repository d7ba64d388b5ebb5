"""Triton kernels for absorbed MLA over the paged latent cache (see kernels/mla.py for the checked wrappers).

Every head of a sequence reads the same cache rows [c_kv (KV_LORA) | k_pe (ROPE)], so a program takes a block
of query rows (heads of one token in decode; (token, head) pairs in prefill) and loads each cache tile once for
all of them: scores = q_latent . c_kv + q_pe . k_pe, values = c_kv. Softmax is online (flash attention) in
base 2, with fp32 accumulators.

Decode is split-KV (flash-decoding): program (head block, sequence, split) covers one chunk of the context and
writes a normalized partial output and its log-sum-exp; mla_decode_reduce_kernel merges the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.tuning import autotune
from deepseek_mcp.kernels.util import cdiv, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _tile_scores(q, qpe, cache_ptr, rows, pmask, offs_l, offs_r, lmask, rmask,
                 KV_LORA: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Load one tile of cache rows (row offsets `rows` [BLOCK_N]) -> (scores [BM, BLOCK_N] fp32, c_kv tile)."""
    kv = tl.load(cache_ptr + rows[:, None] + offs_l[None, :], mask=pmask[:, None] & lmask[None, :], other=0.0)
    kpe = tl.load(cache_ptr + rows[:, None] + KV_LORA + offs_r[None, :], mask=pmask[:, None] & rmask[None, :],
                  other=0.0)
    if UPCAST:  # the CPU interpreter cannot multiply bf16 (it sees raw uint16)
        kv = kv.to(tl.float32)
        kpe = kpe.to(tl.float32)
    s = tl.dot(q, tl.trans(kv), input_precision=PREC)
    s = tl.dot(qpe, tl.trans(kpe), acc=s, input_precision=PREC)
    return s, kv


@triton.jit
def mla_decode_kernel(
    q_ptr, qpe_ptr, cache_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    H, B_BUCKET, sm_scale_log2,  # B_BUCKET only keys the autotuner
    stride_qb, stride_qh, stride_pb, stride_ph, stride_cb, stride_ct, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_h = tl.program_id(0)  # fastest: the head blocks of one (sequence, split) share cache tiles in L2
    b = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    lmask = offs_l < KV_LORA
    rmask = offs_r < ROPE
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
                mask=hmask[:, None] & lmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_L]
    qpe = tl.load(qpe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_r[None, :],
                  mask=hmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    if UPCAST:
        q = q.to(tl.float32)
        qpe = qpe.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_L), tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=pmask, other=0)
        rows = blk.to(tl.int64) * stride_cb + (pos % PAGE) * stride_ct  # [BLOCK_N]
        s, kv = _tile_scores(q, qpe, cache_ptr, rows, pmask, offs_l, offs_r, lmask, rmask, KV_LORA, UPCAST, PREC)
        s = tl.where(pmask[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b * stride_ob + split * stride_os + heads[:, None] * stride_oh + offs_l[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & lmask[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def mla_decode_reduce_kernel(
    o_part_ptr, lse_ptr, o_ptr,  # o_part [B, H, S, L] fp32, lse [B, H, S] fp32 (base 2), o [B, H, L]
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    KV_LORA: tl.constexpr, BLOCK_L: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty sequence: every weight is 0, the output 0
    offs_l = tl.arange(0, BLOCK_L)
    lmask = offs_l < KV_LORA
    total = tl.sum(tl.math.exp2(lse - m), axis=0)
    acc = tl.zeros((BLOCK_L,), tl.float32)
    part = o_part_ptr + b * stride_pb + h * stride_ph
    for s in range(NUM_SPLITS):
        w = tl.math.exp2(tl.load(lse_row + s) - m)
        acc += w * tl.load(part + s * stride_ps + offs_l, mask=lmask, other=0.0)
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_l, o.to(o_ptr.dtype.element_ty), mask=lmask)


@triton.jit
def mla_prefill_kernel(
    q_ptr, qpe_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, o_ptr,
    B, H, T_BUCKET, sm_scale_log2,  # T_BUCKET only keys the autotuner
    stride_q, stride_p, stride_cb, stride_ct, stride_btb, stride_o,  # q, q_pe, out as [T * H, D] row strides
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Rows of sequence b are its (new token, head) pairs, token-major; each program takes BLOCK_M of them.
    Tiles are numbered sequence by sequence (from query_start_loc, on the device), late tiles first."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    bmask = offs_b < B
    q_begin = tl.load(qsl_ptr + offs_b, mask=bmask, other=0)
    q_lens = tl.load(qsl_ptr + offs_b + 1, mask=bmask, other=0) - q_begin
    tiles = (q_lens * H + BLOCK_M - 1) // BLOCK_M  # [BLOCK_B]
    tiles_end = tl.cumsum(tiles, axis=0)
    b = tl.sum((tiles_end <= pid).to(tl.int32), axis=0)
    if b >= B:
        return
    sel = offs_b == b
    tile = tl.sum(tl.where(sel, tiles_end, 0), axis=0) - 1 - pid  # reversed within the sequence
    q_start = tl.sum(tl.where(sel, q_begin, 0), axis=0)
    q_len = tl.sum(tl.where(sel, q_lens, 0), axis=0)
    seq_len = tl.load(seq_lens_ptr + b)

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < q_len * H
    q_pos = seq_len - q_len + r // H  # [BLOCK_M] absolute position of each row's token
    row = (q_start * H + r).to(tl.int64)  # flattened (token, head) row, token-major
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    lmask = offs_l < KV_LORA
    rmask = offs_r < ROPE
    q = tl.load(q_ptr + row[:, None] * stride_q + offs_l[None, :], mask=row_ok[:, None] & lmask[None, :], other=0.0)
    qpe = tl.load(qpe_ptr + row[:, None] * stride_p + offs_r[None, :], mask=row_ok[:, None] & rmask[None, :],
                  other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        qpe = qpe.to(tl.float32)

    kv_end = tl.minimum(tl.max(tl.where(row_ok, q_pos, 0), axis=0) + 1, seq_len)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_L), tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < kv_end
        blk = tl.load(bt_row + pos // PAGE, mask=pmask, other=0)
        rows = blk.to(tl.int64) * stride_cb + (pos % PAGE) * stride_ct
        s, kv = _tile_scores(q, qpe, cache_ptr, rows, pmask, offs_l, offs_r, lmask, rmask, KV_LORA, UPCAST, PREC)
        visible = pmask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: position 0 is visible to every row
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + row[:, None] * stride_o + offs_l[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & lmask[None, :])


def _cfg(bm: int, bn: int, warps: int, stages: int, rows: str) -> triton.Config:
    return triton.Config({rows: bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# acc [rows, 512] fp32 lives in registers: 64 rows need 8 warps (255 registers, wgmma), 16-32 rows use mma.sync.
# Checked with sm_90 ptxas (python -m deepseek_mcp.kernels.aot --all-configs): none of the decode configs spill;
# the prefill 64-row ones spill 136-268 bytes (its causal mask keeps a few more values live), the others none.
DECODE_CONFIGS = [_cfg(64, 32, 8, 2, "BLOCK_H"), _cfg(64, 16, 8, 3, "BLOCK_H"), _cfg(32, 32, 8, 2, "BLOCK_H"),
                  _cfg(32, 16, 4, 3, "BLOCK_H"), _cfg(16, 32, 4, 2, "BLOCK_H"), _cfg(16, 16, 4, 3, "BLOCK_H")]
PREFILL_CONFIGS = [_cfg(64, 16, 8, 3, "BLOCK_M"), _cfg(64, 32, 8, 1, "BLOCK_M"), _cfg(64, 32, 8, 2, "BLOCK_M"),
                   _cfg(32, 32, 8, 2, "BLOCK_M"), _cfg(16, 32, 4, 3, "BLOCK_M")]


def _prune_decode(configs, named_args, **kwargs):
    cap = max(16, next_pow2(named_args["H"]))
    return [c for c in configs if c.kwargs["BLOCK_H"] <= cap] or configs[-1:]


_decode_tuned = autotune(configs=DECODE_CONFIGS, key=["H", "B_BUCKET", "NUM_SPLITS", "KV_LORA", "ROPE"],
                                prune_configs_by={"early_config_prune": _prune_decode})(mla_decode_kernel)
_prefill_tuned = autotune(configs=PREFILL_CONFIGS, key=["H", "T_BUCKET", "KV_LORA", "ROPE"])(mla_prefill_kernel)


def num_splits_for(batch: int, heads: int, max_seq_len: int, sms: int) -> int:
    """KV splits per sequence: enough programs for one wave (counting 64-head blocks), but >= 1024 tokens per
    split, since each split writes and re-reads a [H, kv_lora] fp32 partial (256 KB at 128 heads). Rounded down
    to a power of two (1, 2, 4, ..., 64): NUM_SPLITS is a compile-time constant, so a server compiles (and warms
    at load) 7 variants per batch bucket instead of one per 1,024 tokens of context."""
    programs = batch * cdiv(heads, 64)
    want = max(1, min(cdiv(sms, programs), cdiv(max(max_seq_len, 1), 1024), 64))
    return 1 << (want.bit_length() - 1)


def _meta(q: torch.Tensor, cache: torch.Tensor, rope: int) -> dict:
    kv_lora = q.shape[-1]
    return dict(KV_LORA=kv_lora, ROPE=rope, BLOCK_L=max(16, next_pow2(kv_lora)), BLOCK_R=max(16, next_pow2(rope)),
                PAGE=cache.shape[1], UPCAST=interpreting(), PREC="ieee" if cache.dtype == torch.float32 else "tf32")


def launch_mla_decode(
    q: torch.Tensor, qpe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, out: torch.Tensor, num_splits: int, config: dict | None = None,
) -> None:
    """q [B, H, L], qpe [B, H, R] (cache dtype), out [B, H, L]. `config` (tests) fixes BLOCK_H/BLOCK_N/warps."""
    bsz, heads, kv_lora = q.shape
    meta = _meta(q, cache, qpe.shape[-1])
    if num_splits > 1:
        o_part = torch.empty((bsz, heads, num_splits, kv_lora), dtype=torch.float32, device=q.device)
        lse = torch.empty((bsz, heads, num_splits), dtype=torch.float32, device=q.device)
        o_strides = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
    else:
        o_part, lse = out, out  # lse is not written with one split
        o_strides = (out.stride(0), out.stride(1), 0)
    kernel, cfg = _decode_tuned, {}
    if config is not None:
        kernel, cfg = mla_decode_kernel, {"num_warps": 4, "num_stages": 2, **config}
    elif interpreting():
        kernel, cfg = mla_decode_kernel, {"BLOCK_H": 16, "BLOCK_N": 16}

    def grid(m):
        return (cdiv(heads, m["BLOCK_H"]), bsz, num_splits)

    kernel[grid](q, qpe, cache, block_tables, seq_lens, o_part, lse,
                 heads, next_pow2(bsz), scale * LOG2E,
                 q.stride(0), q.stride(1), qpe.stride(0), qpe.stride(1), cache.stride(0), cache.stride(1),
                 block_tables.stride(0), *o_strides,
                 lse.stride(0) if num_splits > 1 else 0, lse.stride(1) if num_splits > 1 else 0,
                 NUM_SPLITS=num_splits, **meta, **cfg)
    if num_splits > 1:
        mla_decode_reduce_kernel[(bsz, heads)](
            o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), KV_LORA=kv_lora, BLOCK_L=meta["BLOCK_L"], NUM_SPLITS=num_splits,
            BLOCK_S=max(2, next_pow2(num_splits)), num_warps=4)


def launch_mla_prefill(
    q: torch.Tensor, qpe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, scale: float, out: torch.Tensor, config: dict | None = None,
) -> None:
    """q [T, H, L], qpe [T, H, R] (cache dtype), out [T, H, L]; each with stride(0) == H * stride(1)."""
    tokens, heads, _ = q.shape
    bsz = seq_lens.shape[0]
    meta = _meta(q, cache, qpe.shape[-1])
    kernel, cfg = _prefill_tuned, {}
    if config is not None:
        kernel, cfg = mla_prefill_kernel, {"num_warps": 4, "num_stages": 2, **config}
    elif interpreting():
        kernel, cfg = mla_prefill_kernel, {"BLOCK_M": 16, "BLOCK_N": 16}
    rows = tokens * heads

    def grid(m):  # each sequence wastes at most one partial tile
        return (min(cdiv(rows, m["BLOCK_M"]) + bsz, rows),)

    kernel[grid](q, qpe, cache, block_tables, seq_lens, query_start_loc, out,
                 bsz, heads, next_pow2(tokens), scale * LOG2E,
                 q.stride(1), qpe.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0), out.stride(1),
                 BLOCK_B=max(16, next_pow2(bsz)), **meta, **cfg)
