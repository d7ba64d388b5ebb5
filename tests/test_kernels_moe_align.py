"""MoE row alignment (kernels/moe_align.py) against its twin and an independent python sorted() reference.

Exact: offsets, order and inv are integers. Fresh random ids for E not a power of two, T*k not a multiple of
the 32-pair chunk, experts with no rows, all pairs on one expert, T = 1 and T = 0, ids out of range; outputs
poisoned with -7 so an unwritten entry shows. Without CUDA in the Triton interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from deepseek_mcp.kernels.moe_align import MOE_ALIGN_MAX_PAIRS, moe_align, moe_align_torch  # noqa: E402
from deepseek_mcp.kernels.platform import triton_available  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def reference(ids: torch.Tensor, num_experts: int) -> tuple[list[int], list[int], list[int]]:
    """From python lists: pairs sorted by (expert, pair index), an id outside [0, E) counting as E."""
    flat = [e if 0 <= e < num_experts else num_experts for e in ids.flatten().tolist()]
    order = sorted(range(len(flat)), key=lambda p: (flat[p], p))
    inv = [0] * len(flat)
    for row, p in enumerate(order):
        inv[p] = row
    offsets = [sum(1 for e in flat if e < bound) for bound in range(num_experts + 1)]
    return offsets, order, inv


def poisoned_align(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """moe_align with torch.empty patched to -7-filled tensors: an entry the kernel skips stays -7."""
    real_empty = torch.empty

    def poisoned(*size, **kw):
        return real_empty(*size, **kw).fill_(-7)

    torch.empty = poisoned
    try:
        return moe_align(ids, num_experts)
    finally:
        torch.empty = real_empty


def check(ids: torch.Tensor, num_experts: int, what: str) -> None:
    out = poisoned_align(ids, num_experts)
    twin = moe_align_torch(ids, num_experts)
    ref = reference(ids.cpu(), num_experts)
    for name, got, tw, r in zip(("offsets", "order", "inv"), out, twin, ref):
        assert got.dtype == torch.int32 and tw.dtype == torch.int32, f"{what} {name}: {got.dtype}, {tw.dtype}"
        assert got.device == ids.device and got.is_contiguous(), f"{what} {name}"
        assert got.cpu().tolist() == r, f"{what}: {name} differs from the sorted() reference"
        assert torch.equal(got, tw), f"{what}: {name} differs from the twin"


def random_ids(t: int, k: int, e: int, live: list[int] | None = None, dtype=torch.int64) -> torch.Tensor:
    """[t, k] ids drawn from `live` experts (all by default), from torch's generator (the test's seed)."""
    pool = torch.tensor(live if live is not None else list(range(e)))
    return pool[torch.randint(0, len(pool), (t, k))].to(dtype).to(DEV)


@needs_triton
@pytest.mark.parametrize(("t", "k", "e"), [(1, 8, 256), (1, 9, 257), (5, 9, 257), (7, 3, 6), (40, 8, 33),
                                           (64, 9, 257), (3, 1, 1), (13, 2, 511)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_moe_align_random(t, k, e, dtype):
    check(random_ids(t, k, e, dtype=dtype), e, f"T={t} k={k} E={e} {dtype}")


@needs_triton
def test_moe_align_sparse_and_skewed():
    e = 257
    live = [3, 100, 256]  # experts 0, the middle and e - 2 have no rows; the last one has
    check(random_ids(37, 9, e, live), e, "three live experts")
    check(torch.full((11, 9), 200, device=DEV), e, "all pairs on expert 200")
    check(torch.zeros(50, 3, dtype=torch.int32, device=DEV), 7, "all pairs on expert 0")
    check(torch.full((33, 1), 6, device=DEV), 7, "all pairs on the last expert, T*k = 33")


@needs_triton
def test_moe_align_shared_expert_column():
    """Every token also routed to expert E - 1 (the stacked shared expert): its rows are the last T."""
    t, e = 21, 257
    ids = torch.cat((random_ids(t, 8, e - 1), torch.full((t, 1), e - 1, device=DEV)), dim=1)
    check(ids, e, "shared expert")
    offsets, order, _ = moe_align(ids, e)
    assert offsets[-2].item() == 8 * t
    assert order[-t:].tolist() == [9 * i + 8 for i in range(t)]


@needs_triton
def test_moe_align_no_tokens_and_non_contiguous():
    offsets, order, inv = moe_align(torch.empty(0, 9, dtype=torch.int64, device=DEV), 10)
    assert offsets.tolist() == [0] * 11 and order.numel() == 0 and inv.numel() == 0
    ids = random_ids(9, 12, 20)[:, ::2]  # [9, 6] with a stride
    check(ids, 20, "strided ids")


def test_moe_align_twin_above_the_cap_and_many_experts():
    """Past MOE_ALIGN_MAX_PAIRS (or 511 experts) moe_align is the twin; checked here on the CPU."""
    ids = random_ids(MOE_ALIGN_MAX_PAIRS // 8 + 3, 8, 300).cpu()
    for got, r in zip(moe_align_torch(ids, 300), reference(ids, 300)):
        assert got.tolist() == r
    ids = random_ids(4, 3, 512).cpu()
    for got, r in zip(moe_align(ids, 512), reference(ids, 512)):
        assert got.tolist() == r


@needs_triton
def test_moe_align_ids_out_of_range_go_last_and_show_in_offsets():
    """Not silently mixed in: such pairs get the rows after offsets[E] (< T*k), in pair order, no stray store."""
    e = 7
    ids = random_ids(12, 3, e)
    ids[0, 1], ids[5, 0], ids[11, 2], ids[6, 1] = 7, -1, 100, -(2**40)
    check(ids, e, "out of range")
    offsets, order, _ = moe_align(ids, e)
    assert offsets[-1].item() == 36 - 4
    assert order[-4:].tolist() == [1, 15, 19, 35]


def test_moe_align_rejects_bad_arguments():
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids must have 2 dims"):
        moe_align(ids.flatten(), 4)
    with pytest.raises(ValueError, match="ids has dtype float32"):
        moe_align(ids.float(), 4)
    with pytest.raises(ValueError, match="ids has dtype int16"):
        moe_align_torch(ids.to(torch.int16), 4)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_experts must be a positive int"):
            moe_align(ids, bad)
    with pytest.raises(ValueError, match="ids must be a torch.Tensor"):
        moe_align_torch([[0, 1]], 4)
