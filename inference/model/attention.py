"""Torch paths of MLA over the paged latent cache: absorbed decode (batched) and naive prefill (the absorbed
prefill, which the CPU path never runs, is a test reference: tests/reference/mla.py).

The cache `[num_blocks, block_size, C + R]` holds per token the normalized latent c_kv (C columns, also the
value in the absorbed form) and the roped key k_pe (R columns). New tokens are already written into it.
All math in fp32. The Triton kernels in kernels/mla.py compute the same things on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Flattened batch of T new tokens from B sequences over a paged latent cache."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token writes
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0)
    seq_lens: torch.Tensor  # [B] int32 or int64: cached + new tokens after this step
    query_start_loc: torch.Tensor  # [B+1] int32 or int64: cumulative new-token counts
    logits_indices: torch.Tensor  # [N] int64: flattened rows whose logits are wanted
    block_size: int
    seq_lens_list: tuple[int, ...]  # host copies, so the torch path needs no device sync
    query_lens_list: tuple[int, ...]
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)


def decode_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """Absorbed MLA for one new token per sequence, all sequences in one batched matmul (no loop over them).

    q_latent [B, H, C], q_pe [B, H, R] -> [B, H, C] fp32. Sequence b sees positions 0..seq_lens[b]-1; the
    block table is read up to the longest sequence (host-known `max_seq_len`), shorter rows are masked.
    """
    bsz, c = q_latent.shape[0], q_latent.shape[-1]
    num_blocks = -(-meta.max_seq_len // meta.block_size)
    kv = cache[meta.block_tables[:, :num_blocks]].view(bsz, num_blocks * meta.block_size, -1).float()  # [B, L, C+R]
    past_end = torch.arange(kv.shape[1], device=kv.device)[None, :] >= meta.seq_lens[:, None]  # [B, L]
    shortest = min(meta.seq_lens_list)  # slots past a sequence's end may hold anything (NaN included): zero them
    kv[:, shortest:].masked_fill_(past_end[:, shortest:, None], 0.0)
    q = torch.cat((q_latent, q_pe), dim=-1).float()  # [B, H, C+R]
    scores = torch.bmm(q, kv.transpose(1, 2)).mul_(scale)  # [B, H, L]
    scores.masked_fill_(past_end[:, None, :], float("-inf"))
    return torch.bmm(scores.softmax(-1), kv[..., :c])  # [B, H, C]


def prefill_attention_naive(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                            w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive MLA for prefill chunks: K and V expanded per head from the latent, causal attention per head over
    `nope + R` / `v` (what FlashMLA, vLLM and SGLang use for prefill: 3.4x fewer FLOPs than the absorbed form
    at V3 shapes). q_nope [T, H, nope], q_pe [T, H, R], w_uk [H, nope, C], w_uv [H, v, C] -> [T, H, v] fp32.
    """
    c, bs = w_uk.shape[-1], meta.block_size
    heads, vdim = w_uv.shape[0], w_uv.shape[1]
    out = torch.empty(q_nope.shape[0], heads, vdim, dtype=torch.float32, device=q_nope.device)
    wk, wv = w_uk.float(), w_uv.float()
    start = 0
    for b, (seq_len, q_len) in enumerate(zip(meta.seq_lens_list, meta.query_lens_list)):
        kv = cache[meta.block_tables[b, : -(-seq_len // bs)]].reshape(-1, cache.shape[-1])[:seq_len].float()
        if q_len == 1:  # a decode row of a mixed step: absorbed, so the context is not expanded per head
            q_lat = torch.einsum("hd,hdc->hc", q_nope[start].float(), wk)  # [H, C]
            scores = (q_lat @ kv[:, :c].T + q_pe[start].float() @ kv[:, c:].T) * scale  # [H, L]
            out[start] = torch.einsum("hc,hvc->hv", scores.softmax(-1) @ kv[:, :c], wv)
            start += 1
            continue
        k_nope = torch.einsum("lc,hdc->hld", kv[:, :c], wk)  # [H, L, nope]
        k = torch.cat((k_nope, kv[None, :, c:].expand(heads, -1, -1)), dim=-1)  # [H, L, nope + R]
        v = torch.einsum("lc,hvc->hlv", kv[:, :c], wv)  # [H, L, v]
        q = torch.cat((q_nope[start : start + q_len], q_pe[start : start + q_len]), dim=-1)
        q = q.float().transpose(0, 1)  # [H, n, nope + R]
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)  # [H, n, v]
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def prefill_naive_kernel(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                         w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton path of the naive form: the step's contexts gathered from the paged cache, K and V expanded
    per head by two GEMMs (once per step), then `kernels.mla_naive.mla_prefill_naive` -> [T, H, v]."""
    from deepseek_mcp.kernels.mla_naive import mla_prefill_naive

    bs, c, dev = meta.block_size, w_uk.shape[-1], cache.device
    in_block = torch.arange(bs, device=dev)
    slots = torch.cat([(meta.block_tables[b, : -(-n // bs)].long()[:, None] * bs + in_block).flatten()[:n]
                       for b, n in enumerate(meta.seq_lens_list)])  # [S] one loop step per sequence
    kv = cache.view(-1, cache.shape[-1])[slots]  # [S, C + R]
    k = F.linear(kv[:, :c], w_uk.reshape(-1, c)).view(kv.shape[0], w_uk.shape[0], -1)  # [S, H, nope]
    v = F.linear(kv[:, :c], w_uv.reshape(-1, c)).view(kv.shape[0], w_uv.shape[0], -1)  # [S, H, v]
    starts = [0]
    for n in meta.seq_lens_list:
        starts.append(starts[-1] + n)
    kv_start = torch.tensor(starts, dtype=torch.int64, device=dev)  # [B + 1]
    q = torch.cat((q_nope, q_pe), dim=-1).to(k.dtype)  # [T, H, nope + R]
    return mla_prefill_naive(q, k, kv[:, c:].to(k.dtype), v, meta.seq_lens, meta.query_start_loc, kv_start, scale,
                             max_q_len=max(meta.query_lens_list))
