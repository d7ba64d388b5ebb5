"""Absorbed multi-head latent attention over the paged latent cache.

cache [num_blocks, block_size, kv_lora + rope] holds per token the normalized latent c_kv (first kv_lora
columns, also the value) and the roped key k_pe (last rope columns). A sequence's position p lives at
cache[block_tables[b, p // block_size], p % block_size]. For a query row: score_p = (q_latent . c_kv_p +
q_pe . k_pe_p) * softmax_scale, output = softmax(scores) @ c_kv over the visible positions.

`mla_decode` / `mla_prefill` launch Triton kernels (kernels/mla_triton.py, imported on first use). The references
they are tested against, `mla_decode_torch` / `mla_prefill_torch` (same signatures; they gather through the block
table and do float32 math), live in tests/reference/mla.py.
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import check_launchable, check_tensor, device_sms

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
