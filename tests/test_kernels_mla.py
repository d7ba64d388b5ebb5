"""MLA over the paged latent cache: mla_decode / mla_prefill against their twins and a float64 reference.

The float64 reference is written independently of the twins: it addresses the cache through the slot formula
block_tables[b, p // block_size] * block_size + p % block_size on the flattened cache. Without CUDA the Triton
kernels run in the CPU interpreter with small head dims (kv_lora 48, not a power of two; rope 16); with CUDA the
V3 dims (512 + 64, 128 heads, block 64). Tolerance: outputs within 1e-2 relative (+1e-4 of max) of float64.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
from helpers import assert_close
from reference.mla import mla_decode_torch, mla_prefill_torch  # noqa: E402

from deepseek_mcp.kernels.aot import run_family, toolchain_available  # noqa: E402
from deepseek_mcp.kernels.mla import mla_decode, mla_prefill  # noqa: E402
from deepseek_mcp.kernels.platform import triton_available  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SMALL = dict(kv_lora=48, rope=16, block_size=16)
V3 = dict(kv_lora=512, rope=64, block_size=64)




def make_cache(seq_lens: list[int], kv_lora: int, rope: int, block_size: int, dtype=torch.bfloat16, device=DEV):
    """Random cache with shuffled, non-contiguous block tables (padded with 0) and NaN in every unused slot,
    so a kernel that reads past a sequence's end or outside its blocks shows NaN."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    cache = torch.randn(num_blocks, block_size, kv_lora + rope, device=device).to(dtype)
    perm = torch.randperm(num_blocks, device=device)
    width = max(max(need), 1) + 2
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=device)
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    k = 0
    for b, (n, nb) in enumerate(zip(seq_lens, need)):
        block_tables[b, :nb] = perm[k : k + nb].int()
        k += nb
        pos = torch.arange(n, device=device)
        used[block_tables[b, pos // block_size].long() * block_size + pos % block_size] = True
    cache.view(-1, cache.shape[-1])[~used] = float("nan")
    return cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def reference(q, qpe, cache, block_tables, seq_lens, q_lens, scale):
    """float64 causal attention, query rows grouped by sequence (q_lens[b] rows each, the last ones)."""
    flat = cache.reshape(-1, cache.shape[-1]).double()
    bs, kv_lora = cache.shape[1], q.shape[-1]
    q, qpe, bt = q.double(), qpe.double(), block_tables.long()
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    row = 0
    for b, (n, ql) in enumerate(zip(seq_lens.tolist(), q_lens)):
        if ql == 0:
            continue
        pos = torch.arange(n, device=q.device)
        kv = flat[bt[b, pos // bs] * bs + pos % bs]  # [n, C + R]
        s = (torch.einsum("qhc,nc->qhn", q[row : row + ql], kv[:, :kv_lora])
             + torch.einsum("qhr,nr->qhn", qpe[row : row + ql], kv[:, kv_lora:])) * scale  # [ql, H, n]
        q_pos = torch.arange(n - ql, n, device=q.device)
        s = s.masked_fill((pos[None, :] > q_pos[:, None])[:, None, :], float("-inf"))
        out[row : row + ql] = torch.einsum("qhn,nc->qhc", torch.softmax(s, -1), kv[:, :kv_lora])
        row += ql
    return out


def decode_inputs(seq_lens, heads, dims, dtype=torch.bfloat16, device=DEV):
    cache, bt, sl = make_cache(seq_lens, dims["kv_lora"], dims["rope"], dims["block_size"], dtype, device)
    q = torch.randn(len(seq_lens), heads, dims["kv_lora"], device=device).to(dtype)
    qpe = torch.randn(len(seq_lens), heads, dims["rope"], device=device).to(dtype)
    return q, qpe, cache, bt, sl


# ------------------------------------------------------------------------------------------------- decode


@needs_triton
@pytest.mark.parametrize("heads", [1, 16, 128])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_mla_decode(heads, num_splits):
    seq_lens = [1, 17, 100, 16] if heads < 128 else [33, 5]  # block 16: ends exactly on / across boundaries
    dims = SMALL if not CUDA else V3
    if CUDA:
        seq_lens = [1, 65, 3000, 64, 700]
    q, qpe, cache, bt, sl = decode_inputs(seq_lens, heads, dims)
    scale = 0.3
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    assert mla_decode(q, qpe, cache, bt, sl, scale, num_splits=num_splits, max_seq_len=max(seq_lens), out=out) is out
    ref = reference(q, qpe, cache, bt, sl, [1] * len(seq_lens), scale)
    assert_close(out, ref, what=f"decode H={heads} splits={num_splits}")
    assert_close(mla_decode_torch(q, qpe, cache, bt, sl, scale), ref, what="decode twin")


@needs_triton
def test_mla_decode_empty_sequence_gives_zeros_and_fp32_cache():
    q, qpe, cache, bt, sl = decode_inputs([0, 20, 9], 16, SMALL, dtype=torch.float32)
    for splits in (1, 2):
        out = mla_decode(q, qpe, cache, bt, sl, 0.5, num_splits=splits)
        assert torch.all(out[0] == 0)
        assert_close(out[1:], reference(q, qpe, cache, bt, sl, [1, 1, 1], 0.5)[1:], rtol=1e-5, what="fp32 cache")
        assert torch.all(mla_decode_torch(q, qpe, cache, bt, sl, 0.5)[0] == 0)


@needs_triton
@pytest.mark.parametrize("cfg", [{"BLOCK_H": 32, "BLOCK_N": 32, "num_warps": 4},
                                 {"BLOCK_H": 64, "BLOCK_N": 16, "num_warps": 8}])
def test_mla_decode_explicit_configs(cfg):
    from deepseek_mcp.kernels.mla_triton import launch_mla_decode

    q, qpe, cache, bt, sl = decode_inputs([50, 3], 40, SMALL)  # 40 heads: a partial head block
    for splits in (1, 4):
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
        launch_mla_decode(q, qpe, cache, bt, sl, 0.2, out, splits, config=cfg)
        assert_close(out, reference(q, qpe, cache, bt, sl, [1, 1], 0.2), what=f"{cfg} splits={splits}")


def test_num_splits_heuristic():
    from deepseek_mcp.kernels.mla_triton import num_splits_for

    assert num_splits_for(1, 128, 65536, 132) == 64  # one long sequence spreads over the GPU
    assert num_splits_for(1, 128, 100, 132) == 1  # short context: one split
    assert num_splits_for(64, 128, 8192, 132) == 2  # large batch: little splitting
    assert num_splits_for(8, 128, 8192, 132) == 8


# ------------------------------------------------------------------------------------------------ prefill


def prefill_inputs(seq_lens, q_lens, heads, dims, dtype=torch.bfloat16, device=DEV):
    cache, bt, sl = make_cache(seq_lens, dims["kv_lora"], dims["rope"], dims["block_size"], dtype, device)
    total = sum(q_lens)
    q = torch.randn(total, heads, dims["kv_lora"], device=device).to(dtype)
    qpe = torch.randn(total, heads, dims["rope"], device=device).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, qpe, cache, bt, sl, qsl


@needs_triton
@pytest.mark.parametrize("heads", [1, 16, 128])
def test_mla_prefill(heads):
    if CUDA:
        seq_lens, q_lens, dims = [300, 1, 300, 2000, 64], [300, 1, 100, 37, 0], V3
    elif heads < 128:  # whole prompt, a decode, a chunk after a cached prefix, an idle sequence
        seq_lens, q_lens, dims = [21, 1, 40, 9], [21, 1, 23, 0], SMALL
    else:
        seq_lens, q_lens, dims = [18, 5], [3, 2], SMALL
    q, qpe, cache, bt, sl, qsl = prefill_inputs(seq_lens, q_lens, heads, dims)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    assert mla_prefill(q, qpe, cache, bt, sl, qsl, 0.25, out=out) is out
    ref = reference(q, qpe, cache, bt, sl, q_lens, 0.25)
    assert_close(out, ref, what=f"prefill H={heads}")
    assert_close(mla_prefill_torch(q, qpe, cache, bt, sl, qsl, 0.25), ref, what="prefill twin")


@needs_triton
@pytest.mark.parametrize("cfg", [{"BLOCK_M": 32, "BLOCK_N": 32}, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}])
def test_mla_prefill_explicit_configs(cfg):
    from deepseek_mcp.kernels.mla_triton import launch_mla_prefill

    q, qpe, cache, bt, sl, qsl = prefill_inputs([70, 12], [6, 12], 5, SMALL)  # 5 heads: tiles span tokens
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    launch_mla_prefill(q, qpe, cache, bt, sl, qsl, 0.4, out, config=cfg)
    assert_close(out, reference(q, qpe, cache, bt, sl, [6, 12], 0.4), what=str(cfg))


def test_mla_twins_large_against_float64():
    dims = dict(kv_lora=128, rope=32, block_size=64)
    q, qpe, cache, bt, sl = decode_inputs([1, 300, 1025], 32, dims, dtype=torch.float32, device="cpu")
    ref = reference(q, qpe, cache, bt, sl, [1, 1, 1], 0.1)
    assert_close(mla_decode_torch(q, qpe, cache, bt, sl, 0.1), ref, rtol=1e-5, what="decode twin")
    q, qpe, cache, bt, sl, qsl = prefill_inputs([200, 130], [200, 65], 8, dims, torch.float32, "cpu")
    ref = reference(q, qpe, cache, bt, sl, [200, 65], 0.1)
    assert_close(mla_prefill_torch(q, qpe, cache, bt, sl, qsl, 0.1), ref, rtol=1e-5, what="prefill twin")


def test_mla_rejects_bad_arguments():
    q, qpe, cache, bt, sl = decode_inputs([5, 6], 4, SMALL, device="cpu")
    with pytest.raises(ValueError, match="cache last dim"):
        mla_decode_torch(q, qpe, cache[..., :-1], bt, sl, 1.0)
    with pytest.raises(ValueError, match="one query per sequence"):
        mla_decode_torch(q[:1], qpe[:1], cache, bt, sl, 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        mla_prefill_torch(q, qpe, cache, bt, sl, torch.tensor([0, 1], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode_torch(q, qpe, cache, bt, sl.float(), 1.0)


@pytest.mark.skipif(not toolchain_available(), reason="needs triton's NVIDIA backend with its bundled ptxas")
def test_mla_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time build for sm_90a: the 64-head decode tile uses bf16 wgmma (HGMMA) and does not spill."""
    rows = {(r[0], r[1]): r for r in run_family("mla")}
    assert not [r for r in rows.values() if r[2] == "FAILED:"], rows
    decode = rows[("mla_decode_kernel", "H64 N32 w8 s2")]
    assert decode[5] == "HGMMA" and decode[3] == "0", decode
    assert ("mla_prefill_kernel", "M64 N16 w8 s3") in rows and ("mla_decode_reduce_kernel", "S8") in rows
