"""MoE row alignment: the routed (token, expert) pairs sorted by expert, for the grouped GEMM and the combine.

ids [T, k] are the router's expert ids; pair p = t * k + j is token t's j-th expert. Sorted stably by expert
(ties by p), sorted row r holds pair order[r]; pair p sits at row inv[p]; expert e owns rows
offsets[e]:offsets[e+1] (offsets[0] = 0, offsets[E] = T*k). All three int32, on ids' device.

`moe_align` is one Triton launch (kernels/moe_align_triton.py, imported on first use): no host sync, nothing
around it but torch.empty. It runs as a single program, which suits the decode step; above
MOE_ALIGN_MAX_PAIRS pairs (prefill) or MOE_ALIGN_MAX_EXPERTS experts it returns `moe_align_torch` instead,
decided from the shapes alone. `moe_align_torch` is its twin: a stable sort, searchsorted and argsort.

Expert ids are never read on the host. An id outside [0, E), negative or >= E, is not dropped or written out
of bounds: both versions sort it into one more bucket after expert E - 1, so order and inv stay permutations
and offsets[E] < T*k counts the in-range pairs; the grouped GEMM computes no row past offsets[E] and
moe_combine(..., valid_rows=offsets[-1:]) reads none. (An expert-parallel split, each rank holding an index range
of experts, would hand over the ids minus its first expert and pass the others' over this way; the model splits
every expert along its intermediate size instead, inference/model/parallel.py.)
"""

from __future__ import annotations

import torch

from deepseek_mcp.kernels.util import check_launchable, check_tensor

MOE_ALIGN_MAX_PAIRS = 4096  # one program walks T*k / 32 chunks in turn: a decode-sized cap, not yet timed
MOE_ALIGN_MAX_EXPERTS = 511  # the one-hot tile is [32, next_pow2(E + 1)]: experts and the out-of-range bucket


def _triton():
    from deepseek_mcp.kernels import moe_align_triton

    return moe_align_triton


def _check(ids: torch.Tensor, num_experts: int) -> None:
    check_tensor(ids, "ids", ndim=2, dtypes=(torch.int64, torch.int32))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def moe_align_torch(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of `moe_align`: ids [T, k] -> (offsets [E+1], order [T*k], inv [T*k]) int32, by aten sort."""
    _check(ids, num_experts)
    flat = ids.flatten()
    key = flat.masked_fill((flat < 0) | (flat >= num_experts), num_experts)  # out of range: bucket E
    experts, order = key.sort(stable=True)  # [T*k] each
    bounds = torch.arange(num_experts + 1, dtype=experts.dtype, device=ids.device)
    offsets = torch.searchsorted(experts, bounds, out_int32=True)  # [E+1] first row of each expert
    return offsets, order.to(torch.int32), order.argsort().to(torch.int32)


def moe_align(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] int64/int32 -> (offsets [E+1], order [T*k], inv [T*k]) int32 in one launch (or the twin above
    MOE_ALIGN_MAX_PAIRS pairs / MOE_ALIGN_MAX_EXPERTS experts); ids outside [0, E) sorted last, past offsets[E]."""
    _check(ids, num_experts)
    if ids.numel() > MOE_ALIGN_MAX_PAIRS or num_experts > MOE_ALIGN_MAX_EXPERTS:
        return moe_align_torch(ids, num_experts)
    check_launchable(ids.device, "moe_align")
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    order = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device)
    inv = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device)
    flat = ids if ids.is_contiguous() else ids.contiguous()  # the router's ids are: no copy on the hot path
    _triton().launch_moe_align(flat, num_experts, offsets, order, inv)
    return offsets, order, inv
