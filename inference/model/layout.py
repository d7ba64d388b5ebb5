"""Load-time weight layout helpers: FP8 block dequantization and the shared expert stacked onto the routed ones."""

from __future__ import annotations

import torch
from torch import nn


def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """w [..., N, K] e4m3, scale_inv [..., ceil(N/b), ceil(K/b)] -> [..., N, K] dtype, exact in fp32.

    The torch path's per-matmul dequantization (stacked experts included); few ops, since on CPU the number of
    small ops, not bytes, sets the cost of a decode step.
    """
    *lead, n, k = w.shape
    if n % block == 0 and k % block == 0:
        nb, kb = n // block, k // block
        x = w.view(*lead, nb, block, kb, block).to(torch.float32)
        x.mul_(scale_inv.view(*lead, nb, 1, kb, 1))
        return x.view(*lead, n, k).to(dtype)
    scale = scale_inv.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return (w.to(torch.float32) * scale).to(dtype)  # edge blocks: partial rows/columns


def stack_shared_expert(stacked: torch.Tensor, scale: torch.Tensor | None, shared: nn.Module
                        ) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Routed experts' [E, N, K] weight (and [E, Nb, Kb] scales) with a shared expert's Linear [N, K] appended
    as expert E -> [E + 1, N, K] (and its scales)."""
    weight = nn.Parameter(torch.cat((stacked, shared.weight[None])), requires_grad=False)
    if scale is None:
        return weight, None
    return weight, nn.Parameter(torch.cat((scale, shared.weight_scale_inv[None])), requires_grad=False)
