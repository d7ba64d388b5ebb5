"""Absorbed multi-head latent attention over the paged latent cache.

cache [num_blocks, block_size, kv_lora + rope] holds per token the normalized latent c_kv (first kv_lora
columns, also the value) and the roped key k_pe (last rope columns). A sequence's position p lives at
cache[block_tables[b, p // block_size], p % block_size]. For a query row: score_p = (q_latent . c_kv_p +
q_pe . k_pe_p) * softmax_scale, output = softmax(scores) @ c_kv over the visible positions.

`mla_decode` / `mla_prefill` launch Triton kernels (kernels/mla_triton.py, imported on first use); the twins
`mla_decode_torch` / `mla_prefill_torch` gather through the block table and do float32 math.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import cdiv, check_launchable, check_tensor, device_sms

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INDEX = (torch.int32, torch.int64)


def _triton():
    from deepseek_mcp.kernels import mla_triton

    return mla_triton


def _check(q_latent, q_pe, cache, block_tables, seq_lens, out, query_start_loc=None) -> torch.Tensor:
    check_tensor(q_latent, "q_latent", ndim=3, dtypes=_FLOATS, last_contiguous=True)
    rows, heads, kv_lora = q_latent.shape
    dev = q_latent.device
    check_tensor(q_pe, "q_pe", ndim=3, dtypes=(q_latent.dtype,), device=dev, last_contiguous=True)
    if tuple(q_pe.shape[:2]) != (rows, heads):
        raise ValueError(f"q_pe shape {tuple(q_pe.shape)} does not match q_latent {tuple(q_latent.shape)}")
    check_tensor(cache, "cache", ndim=3, dtypes=_FLOATS, device=dev, last_contiguous=True)
    if cache.shape[2] != kv_lora + q_pe.shape[2]:
        raise ValueError(f"cache last dim {cache.shape[2]} != kv_lora {kv_lora} + rope {q_pe.shape[2]}")
    check_tensor(seq_lens, "seq_lens", ndim=1, dtypes=_INDEX, device=dev)
    bsz = seq_lens.shape[0]
    check_tensor(block_tables, "block_tables", ndim=2, dtypes=_INDEX, device=dev)
    if block_tables.shape[0] != bsz:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {bsz} sequences")
    if query_start_loc is None:
        if rows != bsz:
            raise ValueError(f"decode takes one query per sequence: q_latent has {rows} rows, seq_lens {bsz}")
    else:
        check_tensor(query_start_loc, "query_start_loc", shape=(bsz + 1,), dtypes=_INDEX, device=dev)
    if out is None:
        return torch.empty((rows, heads, kv_lora), dtype=q_latent.dtype, device=dev)
    check_tensor(out, "out", shape=(rows, heads, kv_lora), dtypes=_FLOATS, device=dev, last_contiguous=True)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] viewable as [T * H, D] rows with one stride (the prefill kernel indexes (token, head) rows)."""
    return t if t.stride(0) == t.shape[1] * t.stride(1) and t.stride(2) == 1 else t.contiguous()


def _gather(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """Positions 0..n-1 of one sequence -> [n, kv_lora + rope] fp32."""
    blocks = block_table[: cdiv(n, cache.shape[1])].long()
    return cache[blocks].reshape(-1, cache.shape[2])[:n].float()


def _attend(q: torch.Tensor, qpe: torch.Tensor, kv: torch.Tensor, scale: float, mask: torch.Tensor | None):
    """q [n, H, L], qpe [n, H, R], kv [S, L + R] fp32 -> [n, H, L]; mask [n, S] True where visible."""
    kv_lora = q.shape[-1]
    scores = (torch.einsum("nhl,sl->nhs", q.float(), kv[:, :kv_lora])
              + torch.einsum("nhr,sr->nhs", qpe.float(), kv[:, kv_lora:])) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("nhs,sl->nhl", scores.softmax(-1), kv[:, :kv_lora])


def mla_decode_torch(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, softmax_scale: float, *, max_seq_len: int | None = None,
    num_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `mla_decode` (max_seq_len and num_splits are accepted and ignored)."""
    o = _check(q_latent, q_pe, cache, block_tables, seq_lens, out)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            o[b] = 0
            continue
        kv = _gather(cache, block_tables[b], n)
        o[b] = _attend(q_latent[b : b + 1], q_pe[b : b + 1], kv, softmax_scale, None)[0]
    return o


def mla_decode(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, softmax_scale: float, *, max_seq_len: int | None = None,
    num_splits: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence: q_latent [B, H, kv_lora], q_pe [B, H, rope] -> [B, H, kv_lora]
    (q_latent's dtype unless `out` is given) over positions 0..seq_lens[b]-1 (the token itself already cached).

    Split-KV: `num_splits` chunks per sequence (default from the batch, heads, SM count and `max_seq_len`;
    pass `max_seq_len` = max(seq_lens) from the host to avoid a device sync), merged by log-sum-exp."""
    o = _check(q_latent, q_pe, cache, block_tables, seq_lens, out)
    check_launchable(q_latent.device, "mla_decode")
    bsz, heads, _ = q_latent.shape
    if bsz == 0 or heads == 0:
        return o
    if num_splits is None:
        longest = int(seq_lens.max()) if max_seq_len is None else int(max_seq_len)
        num_splits = _triton().num_splits_for(bsz, heads, longest, device_sms(q_latent.device))
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in 1..256, got {num_splits}")
    q, qpe = q_latent.to(cache.dtype), q_pe.to(cache.dtype)
    _triton().launch_mla_decode(q, qpe, cache, block_tables, seq_lens, float(softmax_scale), o, num_splits)
    return o


def mla_prefill_torch(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, softmax_scale: float, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `mla_prefill`."""
    o = _check(q_latent, q_pe, cache, block_tables, seq_lens, out, query_start_loc)
    starts = query_start_loc.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        if q1 - q0 > n:
            raise ValueError(f"sequence {b} has {q1 - q0} new tokens but seq_len {n}")
        kv = _gather(cache, block_tables[b], n)
        pos = torch.arange(n - (q1 - q0), n, device=cache.device)
        visible = torch.arange(n, device=cache.device)[None, :] <= pos[:, None]  # [q_len, n]
        o[q0:q1] = _attend(q_latent[q0:q1], q_pe[q0:q1], kv, softmax_scale, visible)
    return o


def mla_prefill(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, softmax_scale: float, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (already written into the cache): q_latent [T, H, kv_lora],
    q_pe [T, H, rope] -> [T, H, kv_lora]. Sequence b owns rows query_start_loc[b]:query_start_loc[b+1]; its new
    token i sits at position seq_lens[b] - q_len_b + i and sees positions 0..that position."""
    o = _check(q_latent, q_pe, cache, block_tables, seq_lens, out, query_start_loc)
    check_launchable(q_latent.device, "mla_prefill")
    if o.numel() == 0 or seq_lens.shape[0] == 0:
        return o
    if not o.is_contiguous():
        raise ValueError("mla_prefill: out must be contiguous")
    q, qpe = _rows(q_latent.to(cache.dtype)), _rows(q_pe.to(cache.dtype))
    _triton().launch_mla_prefill(q, qpe, cache, block_tables, seq_lens, query_start_loc, float(softmax_scale), o)
    return o
