"""Prefill in the naive MLA form: `mla_prefill_naive` (Triton, kernels/mla_naive_triton.py, imported on first use).
The reference it is tested against, `mla_prefill_naive_torch` (same signature, fp32), is in tests/reference/mla.py.

For prefill chunks K and V are expanded per head from the latent once per step (k_nope = c_kv W_UK^T, v = c_kv
W_UV^T, k_pe shared by the heads) and each chunk attends causally over `nope + rope` / `v` per head: 192 + 128
multiply-adds per query, key and head at V3 shapes instead of the absorbed form's 576 + 512.

q [T, H, nope + R] (roped q_pe last); k [S, H, nope], k_pe [S, R], v [S, H, v] hold the contexts of the step's
sequences one after the other, sequence b's from row kv_start_loc[b]; its new token i sits at position
seq_lens[b] - q_len_b + i and sees positions 0..itself. -> [T, H, v].
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INDEX = (torch.int32, torch.int64)


def _triton():
    from deepseek_mcp.kernels import mla_naive_triton

    return mla_naive_triton


def _check(q, k, k_pe, v, seq_lens, qsl, ksl, out) -> torch.Tensor:
    check_tensor(q, "q", ndim=3, dtypes=_FLOATS, last_contiguous=True)
    dev = q.device
    for name, t, nd in (("k", k, 3), ("k_pe", k_pe, 2), ("v", v, 3)):
        check_tensor(t, name, ndim=nd, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    t_, heads, dqk = q.shape
    if k.shape[1] != heads or v.shape[1] != heads or dqk != k.shape[2] + k_pe.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)} + k_pe {tuple(k_pe.shape)}")
    if not k.shape[0] == k_pe.shape[0] == v.shape[0]:
        raise ValueError("k, k_pe and v must have one row per context token")
    for name, d in (("nope", k.shape[2]), ("rope", k_pe.shape[1]), ("v", v.shape[2])):
        if d & (d - 1):
            raise ValueError(f"the {name} head dim must be a power of two, got {d}")
    bsz = seq_lens.shape[0]
    check_tensor(seq_lens, "seq_lens", ndim=1, dtypes=_INDEX, device=dev)
    check_tensor(qsl, "query_start_loc", shape=(bsz + 1,), dtypes=_INDEX, device=dev)
    check_tensor(ksl, "kv_start_loc", shape=(bsz + 1,), dtypes=_INDEX, device=dev)
    return out_or_new(out, (t_, heads, v.shape[2]), q.dtype, dev)


def mla_prefill_naive(q, k, k_pe, v, seq_lens, query_start_loc, kv_start_loc, softmax_scale: float, *,
                      max_q_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal prefill attention per head (flash-style online softmax, fp32 accumulation), one program per
    (query tile, sequence, head). `max_q_len`: the longest chunk, from the host (sizes the grid, no sync)."""
    o = _check(q, k, k_pe, v, seq_lens, query_start_loc, kv_start_loc, out)
    check_launchable(q.device, "mla_prefill_naive")
    if o.numel() and max_q_len > 0:
        _triton().launch_mla_prefill_naive(q, k, k_pe, v, o, seq_lens, query_start_loc, kv_start_loc,
                                           float(softmax_scale), int(max_q_len))
    return o
