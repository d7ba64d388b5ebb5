"""FP8 e4m3 block-scaled weights and activations (DeepSeek-V3 checkpoint format).

Weights are stored as e4m3 with one fp32 `weight_scale_inv` per 128x128 block; edge blocks (N or K not a
multiple of 128) are partial. Dequantization is `w.float() * scale` block by block.
"""

from __future__ import annotations

import torch


def weight_dequant_torch(
    w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Twin of `weight_dequant`: w [N, K] e4m3, scale_inv [ceil(N/bs), ceil(K/bs)] fp32 -> [N, K] dtype."""
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    if tuple(scale_inv.shape) != (nb, kb):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} "
                         f"with {block_size}x{block_size} blocks (expected {(nb, kb)})")
    scale = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return (w.float() * scale).to(dtype)  # [N, K]
