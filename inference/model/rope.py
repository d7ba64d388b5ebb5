"""YaRN rope (DeepSeek-V3's long-context rotary embedding) over the `qk_rope_head_dim` part of queries and keys."""

from __future__ import annotations

import math

import torch

from deepseek_mcp.inference.model.config import RopeConfig, yarn_mscale


class Rotary:
    """YaRN rope (or plain rope) over the `qk_rope_head_dim` part, in fp32."""

    def __init__(self, cfg: RopeConfig, dim: int, device: torch.device):
        self.interleave = cfg.interleave
        pos_freqs = cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        inv_freq = 1.0 / pos_freqs  # [dim/2]
        self.attention_factor = 1.0
        if cfg.type == "yarn":
            low, high = _yarn_correction_range(cfg, dim)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
            extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
            inv_freq = inv_freq / cfg.factor * (1 - extrapolation) + inv_freq * extrapolation
            if cfg.attention_factor is not None:
                self.attention_factor = float(cfg.attention_factor)
            elif cfg.mscale and cfg.mscale_all_dim:
                num, den = yarn_mscale(cfg.factor, cfg.mscale), yarn_mscale(cfg.factor, cfg.mscale_all_dim)
                self.attention_factor = num / den
            else:
                self.attention_factor = yarn_mscale(cfg.factor)
        self.inv_freq = inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., R]; cos/sin [T, R/2]."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        c, s = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:  # pairs (x0, x1), (x2, x3), ... each rotated by one frequency
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:  # halves (x0..x_{R/2-1}), (x_{R/2}..)
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return out.to(x.dtype)


def _yarn_correction_range(cfg: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        turns = cfg.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return low, high
