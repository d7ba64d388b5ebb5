"""Triton kernel of the MoE row alignment (see kernels/moe_align.py for the checked wrapper).

One program walks the T*k (token, expert) pairs twice in chunks of BLOCK_P: pass 1 counts the pairs of each
expert (a [BLOCK_P, BLOCK_E] one-hot compare summed over the chunk), whose exclusive cumsum is the offsets;
pass 2 gives each pair its sorted row = first row of its expert + pairs of that expert in earlier chunks (a
running [BLOCK_E] count) + pairs of that expert earlier in this chunk (a [BLOCK_P, BLOCK_P] compare), and
stores inv[p] = row and order[row] = p. Rows are a stable sort: ties keep the pair order. Ids outside [0, E)
count as one more bucket, E, after every expert: order stays a permutation, offsets[E] counts the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_mcp.kernels.util import next_pow2

# Pairs per chunk: the one-hot tile is [BLOCK_P, BLOCK_E], 32 x 512 at V3's 256 + 1 experts (+ the bucket); with 4 warps
# ptxas (sm_90a) gives 96 registers and no spills (python -m deepseek_mcp.kernels.aot --family moe).
BLOCK_P = 32


@triton.jit
def _bucket(ids_ptr, p, P, E):
    """The expert of pairs p [BLOCK_P] as int32: E for an id outside [0, E), -1 past the last pair (no column)."""
    pmask = p < P
    e = tl.load(ids_ptr + p, mask=pmask, other=0)  # outside [0, E) is legal: other ranks' experts under TP
    return tl.where(pmask, tl.where((e >= 0) & (e < E), e, E), -1).to(tl.int32)


@triton.jit
def moe_align_kernel(
    ids_ptr, off_ptr, order_ptr, inv_ptr,  # ids [P] (T*k, flattened), offsets [E + 1], order [P], inv [P] int32
    P, E,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Stable counting sort of P expert ids by one program; ids outside [0, E) go to bucket E (BLOCK_E > E)."""
    lanes = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, P, BLOCK_P):  # pass 1: pairs per expert
        e = _bucket(ids_ptr, c0 + lanes, P, E)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    base = tl.cumsum(counts, axis=0) - counts  # [BLOCK_E] first row of each expert (E: of the bucket)
    tl.store(off_ptr + cols, base, mask=cols <= E)
    earlier = lanes[None, :] < lanes[:, None]  # [BLOCK_P, BLOCK_P] lane q before lane p
    for c0 in range(0, P, BLOCK_P):  # pass 2: rows; base[e] advances past expert e's rows of this chunk
        p = c0 + lanes
        pmask = p < P
        e = _bucket(ids_ptr, p, P, E)
        hit = e[:, None] == cols[None, :]  # [BLOCK_P, BLOCK_E]
        first = tl.sum(tl.where(hit, base[None, :], 0), axis=1)  # [BLOCK_P]
        rank = tl.sum(((e[None, :] == e[:, None]) & earlier).to(tl.int32), axis=1)
        row = first + rank
        tl.store(inv_ptr + p, row, mask=pmask)
        tl.store(order_ptr + row, p, mask=pmask)
        base += tl.sum(hit.to(tl.int32), axis=0)


def launch_moe_align(ids: torch.Tensor, num_experts: int, offsets: torch.Tensor, order: torch.Tensor,
                     inv: torch.Tensor) -> None:
    """ids [P] contiguous int32/int64; outputs int32, contiguous."""
    moe_align_kernel[(1,)](ids, offsets, order, inv, ids.numel(), num_experts, BLOCK_P=BLOCK_P,
                           BLOCK_E=max(16, next_pow2(num_experts + 1)), num_warps=4)
