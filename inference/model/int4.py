"""The engine's one in-memory form of a 4-bit weight, whatever format the checkpoint stored it in
(quant_formats.py converts each as it is read): for a weight W [N, K] (out, in) with quantization groups of G
consecutive input columns,

- `qweight` int32 [N, K/8]: nibble j (bits 4j..4j+3) of word c holds the unsigned code u in [0, 15] of W[n, 8c + j]
  (compressed-tensors' `pack-quantized` order: packed along K, so a row's groups are contiguous words);
- `scales` [N, K/G] in the checkpoint's scale dtype (fp16 for GPTQ and AWQ, the model dtype for compressed-tensors:
  `Int4Scheme.scale_dtype`), never rounded;
- `zeros` uint8 [N, K/G]: the unsigned zero point z in [0, 15] (8 for a symmetric checkpoint),

and W[n, k] = (u[n, k] - z[n, k // G]) * scales[n, k // G], exact in fp32 (a 4-bit difference times a 16-bit
scale). Stacked experts carry a leading [E] dimension. The weight stays in this form in memory (0.5 byte per
element + 3 bytes per group); the CPU torch path dequantizes the weights a matmul reads, per call, and the Triton
path dequantizes in registers (kernels/w4a16.py).

Tensor parallelism splits along N (column-parallel: whole rows) or K (row-parallel: whole groups); a split that
would cut a quantization group, or a packed word, is refused naming the sizes (`split_int4`).
"""

from __future__ import annotations

import torch

from deepseek_mcp.inference.model.parallel import ParallelConfigError, Shard, TPContext

PACK = 8  # 4-bit codes per int32 word
_SHIFTS = tuple(range(0, 32, 4))


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """u [..., K] integer codes in [0, 15] -> [..., K/8] int32, code j of each 8 in bits 4j..4j+3."""
    *lead, k = u.shape
    if k % PACK:
        raise ValueError(f"cannot pack {k} codes into int32 words of {PACK}")
    x = u.to(torch.int64).view(*lead, k // PACK, PACK)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=u.device)
    words = (x << shifts).sum(-1)  # [..., K/8] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K/8] int32 -> [..., K] uint8 codes (inverse of `pack_int4`)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=q.device)
    u = (q[..., None] >> shifts) & 0xF  # [..., K/8, 8]
    return u.to(torch.uint8).flatten(-2)


def dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
                 ) -> torch.Tensor:
    """qweight [..., N, K/8], scales/zeros [..., N, K/G] -> W [..., N, K] in `dtype`, computed exactly in fp32."""
    u = unpack_int4(qweight)  # [..., N, K]
    *lead, n, k = u.shape
    groups = scales.shape[-1]
    g = k // groups
    w = u.view(*lead, n, groups, g).to(torch.float32) - zeros.view(*lead, n, groups, 1).to(torch.float32)
    w.mul_(scales.view(*lead, n, groups, 1).to(torch.float32))
    return w.view(*lead, n, k).to(dtype)


def split_int4(full: int, tp: TPContext, dim: int, group: int, what: str) -> Shard:
    """This rank's slice of a 4-bit weight's dimension `dim` (0: rows N, 1: input columns K) of length `full`.
    Refuses sizes whose slice would cut a quantization group (K) or a packed word of 8 (N: GPTQ and AWQ pack zero
    points, AWQ also the weight, along N), naming them."""
    n = full // tp.world_size
    unit = group if dim == 1 else PACK
    if n * tp.world_size != full or n % unit:
        what_dim = "input size" if dim == 1 else "output size"
        why = f"the {group}-wide quantization groups" if dim == 1 else "8-wide packed words of the 4-bit format"
        raise ParallelConfigError(f"{what}: {what_dim} {full} over {tp.world_size} rank(s) gives slices of "
                                  f"{full / tp.world_size:g}, which cut {why}; choose a tensor-parallel size whose "
                                  f"slices are multiples of {unit}")
    return Shard(dim, tp.rank * n, n, full)


def int4_params(lead: tuple[int, ...], n: int, k: int, group: int, device: torch.device, what: str = "weight",
                scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialized (qweight [*lead, N, K/8] int32, scales [*lead, N, K/G] scale_dtype, zeros [*lead, N, K/G]
    uint8)."""
    if k % group or k % PACK:
        raise ParallelConfigError(f"{what}: input size {k} is not a multiple of the quantization group size {group}")
    return (torch.empty(*lead, n, k // PACK, dtype=torch.int32, device=device),
            torch.empty(*lead, n, k // group, dtype=scale_dtype, device=device),
            torch.empty(*lead, n, k // group, dtype=torch.uint8, device=device))


def int4_nbytes(n: int, k: int, group: int, scale_bytes: int = 2) -> int:
    """Bytes of one [N, K] weight in this form (the planner's count)."""
    return n * k // 2 + n * (k // group) * (scale_bytes + 1)
