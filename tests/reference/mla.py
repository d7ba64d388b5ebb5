"""The MLA references in plain fp32 torch, one sequence at a time: `mla_decode_torch` / `mla_prefill_torch` and
`mla_prefill_naive_torch` are what the Triton kernels `kernels.mla.mla_decode` / `mla_prefill` and
`kernels.mla_naive.mla_prefill_naive` are tested against (the same signatures as the wrappers, the same input
checks: the kernel modules' own); `prefill_attention_absorbed` is the reference for the served paths (the torch
decode and naive prefill in inference/model/attention.py, the Triton kernels) over `AttentionMetadata`."""

from __future__ import annotations

import torch

from deepseek_mcp.inference.model.attention import AttentionMetadata
from deepseek_mcp.kernels.mla import _check as _check_paged
from deepseek_mcp.kernels.mla_naive import _check as _check_naive
from deepseek_mcp.kernels.util import cdiv


def prefill_attention_absorbed(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                               meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Absorbed MLA for any mix of chunks: q_latent [T, H, C], q_pe [T, H, R] -> [T, H, C] fp32.

    New token i of sequence b sits at position seq_len - q_len + i and sees positions 0..itself.
    """
    c, bs = q_latent.shape[-1], meta.block_size
    out = torch.empty(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    start = 0
    for b, (seq_len, q_len) in enumerate(zip(meta.seq_lens_list, meta.query_lens_list)):
        kv = cache[meta.block_tables[b, : -(-seq_len // bs)]].reshape(-1, cache.shape[-1])[:seq_len].float()
        q = torch.cat((q_latent[start : start + q_len], q_pe[start : start + q_len]), dim=-1).float()  # [n, H, C+R]
        scores = torch.einsum("nhd,ld->nhl", q, kv) * scale  # [n, H, L]
        if q_len > 1:
            pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            future = torch.arange(seq_len, device=q.device)[None, :] > pos[:, None]  # [n, L]
            scores.masked_fill_(future[:, None, :], float("-inf"))
        out[start : start + q_len] = torch.einsum("nhl,lc->nhc", scores.softmax(-1), kv[:, :c])
        start += q_len
    return out


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
    o = _check_paged(q_latent, q_pe, cache, block_tables, seq_lens, out)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            o[b] = 0
            continue
        kv = _gather(cache, block_tables[b], n)
        o[b] = _attend(q_latent[b : b + 1], q_pe[b : b + 1], kv, softmax_scale, None)[0]
    return o


def mla_prefill_torch(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, softmax_scale: float, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `mla_prefill`."""
    o = _check_paged(q_latent, q_pe, cache, block_tables, seq_lens, out, query_start_loc)
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


def mla_prefill_naive_torch(q, k, k_pe, v, seq_lens, query_start_loc, kv_start_loc, softmax_scale: float, *,
                            max_q_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `mla_prefill_naive` (fp32 math, one sequence at a time; max_q_len is ignored)."""
    o = _check_naive(q, k, k_pe, v, seq_lens, query_start_loc, kv_start_loc, out)
    qs, ks = query_start_loc.tolist(), kv_start_loc.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        q0, q1, k0 = qs[b], qs[b + 1], ks[b]
        if q1 == q0:
            continue
        heads = q.shape[1]
        keys = torch.cat((k[k0 : k0 + n], k_pe[k0 : k0 + n, None].expand(-1, heads, -1)), dim=-1).float()
        scores = torch.einsum("thd,shd->hts", q[q0:q1].float(), keys) * softmax_scale  # [H, n_q, n]
        pos = torch.arange(n - (q1 - q0), n, device=q.device)
        future = torch.arange(n, device=q.device)[None, :] > pos[:, None]  # [n_q, n]
        scores.masked_fill_(future[None], float("-inf"))
        o[q0:q1] = torch.einsum("hts,shv->thv", scores.softmax(-1), v[k0 : k0 + n].float()).to(o.dtype)
    return o
