"""Rope with the latent-cache write: `rope_kv_cache` (Triton, kernels/rope_triton.py, imported on first use) and
its twin `rope_kv_cache_torch` (same signature), which the CPU path runs (inference/model/transformer.py).

For each new token: the latent c_kv (first C columns of kv_a_proj's output) is RMS-normalized (fp32, cast to the
activation dtype before the weight), the key's rope part k_pe (last R columns) and the query's q_pe [H, R] are
rotated with cos/sin [T, R/2] (fp32, the YaRN attention factor included) over interleaved pairs (x0, x1),
(x2, x3), ... (DeepSeek's layout) or halves; (c_kv, k_pe) is written into the token's cache slot and the roped
q_pe returned. One launch instead of a norm, two ropes and a scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepseek_mcp.kernels.util import check_launchable, check_tensor, out_or_new

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _check(kv, weight, q_pe, cos, sin, slots, cache) -> None:
    check_tensor(q_pe, "q_pe", ndim=3, dtypes=_FLOATS, last_contiguous=True)
    t, _, r = q_pe.shape
    dev = q_pe.device
    if r % 2:
        raise ValueError(f"the rope dim must be even, got {r}")
    check_tensor(kv, "kv", ndim=2, dtypes=(q_pe.dtype,), device=dev, last_contiguous=True)
    if kv.shape[0] != t or kv.shape[1] <= r:
        raise ValueError(f"kv {tuple(kv.shape)} must be [T, C + R] for q_pe {tuple(q_pe.shape)}")
    check_tensor(weight, "weight", shape=(kv.shape[1] - r,), dtypes=_FLOATS, device=dev)
    for name, x in (("cos", cos), ("sin", sin)):
        check_tensor(x, name, shape=(t, r // 2), dtypes=(torch.float32,), device=dev)
    check_tensor(slots, "slot_mapping", shape=(t,), dtypes=(torch.int32, torch.int64), device=dev)
    check_tensor(cache, "cache", ndim=2, dtypes=_FLOATS, device=dev, last_contiguous=True)
    if cache.shape[1] != kv.shape[1]:
        raise ValueError(f"cache rows {cache.shape[1]} != C + R = {kv.shape[1]}")


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, ..., R], cos/sin [T, R/2] -> roped x in fp32."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    if interleave:  # pairs as complex numbers times cos + i sin: (x1 c - x2 s) + i (x2 c + x1 s), few ops
        rot = torch.view_as_complex(xf.unflatten(-1, (-1, 2)).contiguous()) * torch.complex(c, s)
        return torch.view_as_real(rot).flatten(-2)
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_kv_cache_torch(
    kv: torch.Tensor, weight: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, cache: torch.Tensor, eps: float, interleave: bool = True, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `rope_kv_cache`."""
    _check(kv, weight, q_pe, cos, sin, slot_mapping, cache)
    r = q_pe.shape[-1]
    c_kv = weight * F.rms_norm(kv[:, :-r].float(), (kv.shape[1] - r,), eps=eps).to(kv.dtype)  # [T, C]
    k_pe = _rotate_torch(kv[:, -r:], cos, sin, interleave).to(kv.dtype)  # [T, R]
    cache[slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(cache.dtype)
    q = _rotate_torch(q_pe, cos, sin, interleave).to(q_pe.dtype)  # [T, H, R]
    return q if out is None else out_or_new(out, q_pe.shape, q_pe.dtype, q_pe.device).copy_(q)


def rope_kv_cache(
    kv: torch.Tensor, weight: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, cache: torch.Tensor, eps: float, interleave: bool = True, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """kv [T, C + R] (kv_a_proj's output), weight [C] (kv_a_layernorm), q_pe [T, H, R], cos/sin [T, R/2] fp32,
    slot_mapping [T] (a slot < 0 is not written: CUDA-graph padding rows), cache [slots, C + R] (the flat paged
    cache, written) -> roped q_pe [T, H, R]."""
    _check(kv, weight, q_pe, cos, sin, slot_mapping, cache)
    check_launchable(q_pe.device, "rope_kv_cache")
    q_out = out_or_new(out, q_pe.shape, q_pe.dtype, q_pe.device)
    if q_pe.shape[0]:
        _triton().launch_rope_kv_cache(kv, weight, q_pe, cos.contiguous(), sin.contiguous(), slot_mapping, cache,
                                       q_out, eps, interleave)
    return q_out


def _triton():
    from deepseek_mcp.kernels import rope_triton

    return rope_triton
