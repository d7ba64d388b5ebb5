"""Grouped MoE GEMM against its twin and a float64 per-expert reference.

Experts with no rows (first, middle, last), N and K not multiples of 128, SwiGLU with the up half starting
inside a 128-row scale block, bf16 and FP8 (e4m3 + 128x128 scales, activations through act_quant) weights;
rows gathered per token in the kernel (gather=(order, k)) and activations that come e4m3 (x_scale).
Without CUDA in the Triton interpreter at small sizes; with CUDA also DeepSeek-V3 decode/prefill shapes.
Tolerance: within 1e-2 relative (+1e-4 of max) of float64 on the same (dequantized) inputs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import assert_close
from reference.fp8 import act_quant_torch  # noqa: E402
from reference.moe import moe_grouped_gemm_torch  # noqa: E402

from deepseek_mcp.kernels.aot import run_family, toolchain_available  # noqa: E402
from deepseek_mcp.kernels.moe import moe_grouped_gemm  # noqa: E402
from deepseek_mcp.kernels.moe_align import moe_align_torch  # noqa: E402
from deepseek_mcp.kernels.platform import triton_available  # noqa: E402
from deepseek_mcp.kernels.util import FP8_DTYPE  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




def offsets_for(counts: list[int], device=DEV) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)


def weights(e: int, n: int, k: int, fp8: bool, device=DEV, swiglu: bool = False):
    """[E, N, K] weight; FP8 scales per 128x128 block, or for swiglu gate's blocks then up's."""
    if not fp8:
        return (torch.randn(e, n, k, device=device) / k**0.5).to(torch.bfloat16), None
    w = (torch.randn(e, n, k, device=device) * 64).clamp(-448, 448).to(FP8_DTYPE)
    rows = 2 * -(-(n // 2) // 128) if swiglu else -(-n // 128)
    return w, torch.rand(e, rows, -(-k // 128), device=device) * 2e-3 + 1e-4


def dequant(w: torch.Tensor, s: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """float64 [N, K] of one expert, written from the block definition (independent of the twin)."""
    if s is None:
        return w.double()
    n, k = w.shape
    halves = [(0, n // 2, 0), (n // 2, n, s.shape[0] // 2)] if swiglu else [(0, n, 0)]
    out = torch.empty(n, k, dtype=torch.float64, device=w.device)
    for r0, r1, s0 in halves:
        rows = torch.arange(r1 - r0, device=w.device) // 128 + s0
        cols = torch.arange(k, device=w.device) // 128
        out[r0:r1] = w[r0:r1].double() * s[rows][:, cols].double()
    return out


def reference(x, counts, w, w_scale, activation, scale_fmt=None):
    """float64, expert by expert, from the same inputs the kernel multiplies (act_quant'ed x for FP8)."""
    if w_scale is not None:
        xq, xs = act_quant_torch(x, 128, scale_fmt)
        xd = xq.double() * xs.double().repeat_interleave(128, 1)[:, : x.shape[1]]
    else:
        xd = x.to(w.dtype).double()
    return reference_rows(xd, counts, w, w_scale, activation)


def reference_rows(xd, counts, w, w_scale, activation):
    """float64 rows xd [M, K] sorted by expert (counts[e] rows each) through each expert's weight."""
    n_out = w.shape[1] // 2 if activation == "swiglu" else w.shape[1]
    out = torch.zeros(xd.shape[0], n_out, dtype=torch.float64, device=xd.device)
    r0 = 0
    for e, c in enumerate(counts):
        if c:
            we = dequant(w[e], w_scale[e] if w_scale is not None else None, activation == "swiglu")
            y = xd[r0 : r0 + c] @ we.T
            if activation == "swiglu":
                y = F.silu(y[:, :n_out]) * y[:, n_out:]
            out[r0 : r0 + c] = y
        r0 += c
    return out


def random_counts(m: int, e: int, empty: tuple[int, ...]) -> list[int]:
    """m rows over e experts, the experts in `empty` with none."""
    live = [i for i in range(e) if i not in empty]
    picks = torch.randint(0, len(live), (m,)).tolist()
    counts = [0] * e
    for p in picks:
        counts[live[p]] += 1
    return counts


@needs_triton
@pytest.mark.parametrize("m", [1, 7, 64, 333])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_moe_grouped_gemm(m, fp8, activation):
    e, k, n = (6, 200, 300) if not CUDA else (16, 1000, 600)  # swiglu: I = 150, up rows start in block 1
    counts = random_counts(m, e, empty=(0, 2, e - 1))
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w, ws = weights(e, n, k, fp8, swiglu=activation == "swiglu")
    n_out = n // 2 if activation == "swiglu" else n
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device=DEV)
    off = offsets_for(counts)
    assert moe_grouped_gemm(x, off, w, ws, activation, scale_fmt="ue8m0", out=out) is out
    ref = reference(x, counts, w, ws, activation, "ue8m0")
    assert_close(out, ref, what=f"moe m={m} fp8={fp8} {activation}")
    twin = moe_grouped_gemm_torch(x, off, w, ws, activation, scale_fmt="ue8m0")
    assert_close(twin, ref, what="moe twin")


@needs_triton
def test_moe_many_experts_few_rows_decode_like():
    """256 experts, 8 rows on 8 of them (one token's top-8): the schedule scans all 256 offsets."""
    e, k, n = 256, 160, 64
    counts = [0] * e
    for i in torch.randperm(e)[:8].tolist():
        counts[i] = 1
    x = torch.randn(8, k, device=DEV, dtype=torch.bfloat16)
    w, ws = weights(e, n, k, fp8=True, swiglu=True)
    out = torch.full((8, n // 2), float("nan"), dtype=torch.bfloat16, device=DEV)
    moe_grouped_gemm(x, offsets_for(counts), w, ws, "swiglu", out=out)
    assert_close(out, reference(x, counts, w, ws, "swiglu"), what="256 experts")


@needs_triton
@pytest.mark.parametrize("cfg", [{"BLOCK_M": 32, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8}])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_explicit_configs(cfg, fp8):
    from deepseek_mcp.kernels.fp8 import act_quant
    from deepseek_mcp.kernels.moe_triton import launch_moe_grouped_gemm

    counts = [40, 0, 70, 3]
    m, k, n = sum(counts), 260, 200
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w, ws = weights(4, n, k, fp8, swiglu=True)
    xq, xs = act_quant(x) if fp8 else (x, None)
    out = torch.full((m, n // 2), float("nan"), dtype=torch.bfloat16, device=DEV)
    launch_moe_grouped_gemm(xq, xs, w, ws, offsets_for(counts), out, swiglu=True, config=cfg)
    assert_close(out, reference(x, counts, w, ws, "swiglu"), what=str(cfg))


def test_moe_twin_large_and_fp32():
    counts = random_counts(600, 12, empty=(5,))
    x = torch.randn(600, 384)
    w = torch.randn(12, 512, 384) / 20
    out = moe_grouped_gemm_torch(x, offsets_for(counts, "cpu"), w, None, "swiglu")
    assert_close(out, reference(x, counts, w, None, "swiglu"), rtol=1e-5, what="fp32 twin")


def test_moe_rejects_bad_arguments():
    x = torch.randn(4, 128)
    w, ws = weights(2, 64, 128, fp8=True, device="cpu")
    with pytest.raises(ValueError, match="w_scale has shape"):
        moe_grouped_gemm_torch(x, offsets_for([1, 3], "cpu"), w, ws, "swiglu")  # needs gate + up blocks
    off = offsets_for([1, 3], "cpu")
    with pytest.raises(ValueError, match="w_scale .* is required"):
        moe_grouped_gemm_torch(x, off, w, None)
    with pytest.raises(ValueError, match="expert_offsets"):
        moe_grouped_gemm_torch(x, off[:-1], w, ws)
    with pytest.raises(ValueError, match="activation"):
        moe_grouped_gemm_torch(x, off, w, ws, "gelu")
    with pytest.raises(ValueError, match="disagree on K"):
        moe_grouped_gemm_torch(x[:, :64], off, w, ws)
    with pytest.raises(ValueError, match="swiglu needs"):
        moe_grouped_gemm_torch(x, off, torch.randn(2, 63, 128), None, "swiglu")


def routed(t: int, k: int, e: int, empty: tuple[int, ...]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """t tokens, k distinct experts each, none on `empty` -> (rows per expert, offsets, order [t*k] int32)."""
    live = torch.tensor([i for i in range(e) if i not in empty])
    ids = torch.stack([live[torch.randperm(len(live))[:k]] for _ in range(t)])  # [t, k]
    offsets, order, _ = moe_align_torch(ids, e)
    counts = torch.bincount(ids.flatten(), minlength=e).tolist()
    return counts, offsets.to(DEV), order.to(DEV)


@needs_triton
@pytest.mark.parametrize(("fp8", "quantized"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_moe_gather_and_x_scale(fp8, quantized, activation):
    """gather=(order, k): x is [T, K] per token, read in the kernel; x_scale: x comes e4m3 (FP8 weights)."""
    t, k, e, kk, n = 7, 3, 6, 200, 300  # 21 sorted rows; swiglu: I = 150, up rows start in block 1
    counts, off, order = routed(t, k, e, empty=(0, 4))
    x = torch.randn(t, kk, device=DEV, dtype=torch.bfloat16)
    w, ws = weights(e, n, kk, fp8, swiglu=activation == "swiglu")
    src = order.long() // k
    kw = {"gather": (order if activation else order.long(), k)}  # int32 and int64 orders
    if quantized:
        xq, xs = act_quant_torch(x, 128, "ue8m0")
        xd = xq.double() * xs.double().repeat_interleave(128, 1)[:, :kk]
        x, kw["x_scale"] = xq, xs
        ref = reference_rows(xd[src], counts, w, ws, activation)
    else:
        ref = reference(x[src], counts, w, ws, activation, "ue8m0")
    n_out = n // 2 if activation == "swiglu" else n
    out = torch.full((t * k, n_out), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert moe_grouped_gemm(x, off, w, ws, activation, scale_fmt="ue8m0", out=out, **kw) is out
    assert_close(out, ref, what=f"gather fp8={fp8} x_scale={quantized} {activation}")
    twin = moe_grouped_gemm_torch(x, off, w, ws, activation, scale_fmt="ue8m0", **kw)
    assert twin.dtype == torch.bfloat16
    assert_close(twin, ref, what="gather twin")


@needs_triton
def test_moe_x_scale_without_gather_fp32_out():
    """Sorted e4m3 rows with their scales; out fp32 sets the output dtype (bf16 without out)."""
    counts = [5, 0, 9, 2]
    m, kk, n = sum(counts), 260, 200
    xq, xs = act_quant_torch(torch.randn(m, kk, device=DEV), 128)
    w, ws = weights(4, n, kk, fp8=True)
    ref = reference_rows(xq.double() * xs.double().repeat_interleave(128, 1)[:, :kk], counts, w, ws, None)
    out = torch.full((m, n), float("nan"), device=DEV)
    moe_grouped_gemm(xq, offsets_for(counts), w, ws, x_scale=xs, out=out)
    assert_close(out, ref, what="x_scale fp32 out")
    assert moe_grouped_gemm(xq, offsets_for(counts), w, ws, x_scale=xs).dtype == torch.bfloat16


def test_moe_gather_and_x_scale_rejected():
    x = torch.randn(4, 128)
    w, ws = weights(2, 64, 128, fp8=True, device="cpu")
    off = offsets_for([5, 3], "cpu")
    order = torch.arange(8, dtype=torch.int32)
    xq, xs = act_quant_torch(x)
    with pytest.raises(ValueError, match="gather must be a tuple"):
        moe_grouped_gemm_torch(x, off, w, ws, gather=order)
    with pytest.raises(ValueError, match="gather's k must be a positive int"):
        moe_grouped_gemm_torch(x, off, w, ws, gather=(order, 0))
    with pytest.raises(ValueError, match=r"gather's order has shape \(8,\), expected \(12,\)"):
        moe_grouped_gemm_torch(x, off, w, ws, gather=(order, 3))
    with pytest.raises(ValueError, match="gather's order has dtype float32"):
        moe_grouped_gemm_torch(x, off, w, ws, gather=(order.float(), 2))
    with pytest.raises(ValueError, match="x_scale .* needs float8_e4m3fn weights"):
        moe_grouped_gemm_torch(xq, off, w.float(), None, x_scale=xs)
    with pytest.raises(ValueError, match="x has dtype float32, expected one of: float8_e4m3fn"):
        moe_grouped_gemm_torch(x, off, w, ws, x_scale=xs)
    with pytest.raises(ValueError, match="x_scale has shape"):
        moe_grouped_gemm_torch(xq, off, w, ws, x_scale=xs[:2])
    with pytest.raises(ValueError, match="x_scale has dtype bfloat16"):
        moe_grouped_gemm(xq, off, w, ws, x_scale=xs.bfloat16())


@needs_cuda
@needs_triton
@pytest.mark.parametrize("tokens", [4, 512])
def test_moe_v3_shapes_cuda(tokens):
    """V3: 256 experts, top-8, hidden 7168, expert intermediate 2048 (fused gate+up 4096), then down."""
    e, k, inter = 256, 7168, 2048
    counts = torch.bincount(torch.randint(0, e, (tokens * 8,)), minlength=e).tolist()
    m = tokens * 8
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w13, s13 = weights(e, 2 * inter, k, fp8=True, swiglu=True)
    h = moe_grouped_gemm(x, offsets_for(counts), w13, s13, "swiglu", scale_fmt="ue8m0")
    assert_close(h, reference(x, counts, w13, s13, "swiglu", "ue8m0"), what="V3 gate/up")
    w2, s2 = weights(e, k, inter, fp8=True)
    y = moe_grouped_gemm(h, offsets_for(counts), w2, s2, None, scale_fmt="ue8m0")
    assert_close(y, reference(h, counts, w2, s2, None, "ue8m0"), what="V3 down")


@pytest.mark.skipif(not toolchain_available(), reason="needs triton's NVIDIA backend with its bundled ptxas")
def test_moe_kernel_compiles_for_hopper_without_a_gpu():
    """Ahead-of-time build for sm_90a of the FP8 / bf16, SwiGLU / plain variants; prefill tiles use wgmma."""
    rows = {r[1]: r for r in run_family("moe")}
    assert not [r for r in rows.values() if r[2] == "FAILED:"], rows
    assert rows["fp8 128x128 w8 s3"][5] == "QGMMA" and rows["bf16 swiglu 128x128 w8 s3"][5] == "HGMMA"
    assert all(r[3] == "0" for r in rows.values()), rows
