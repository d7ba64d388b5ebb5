"""Absorbed MLA prefill in plain torch, one sequence at a time: the reference for the served paths (the torch
decode and naive prefill in inference/model/attention.py, the Triton kernels)."""

from __future__ import annotations

import torch

from deepseek_mcp.inference.model.attention import AttentionMetadata


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
