"""The sampler's top-k / top-p candidate masking as one dense mask, for tests of its semantics."""

from __future__ import annotations

import torch

from deepseek_mcp.inference.engine.sampling import _candidates


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (returns a new tensor).

    logits [B, V]; top_k [B] integer (0 or >= V keeps all; exactly k survive, equal logits ranked by lower
    id first); top_p [B] float in (0, 1] (after top-k, keeps the smallest set of most probable tokens whose
    mass reaches p; 1 keeps all).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    if top_k.shape != (num_rows,) or top_p.shape != (num_rows,):
        raise ValueError(
            f"top_k and top_p must be [{num_rows}], got {tuple(top_k.shape)} and {tuple(top_p.shape)}"
        )
    values, ids = _candidates(logits, top_k, top_p)
    return torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
