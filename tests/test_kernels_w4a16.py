"""W4A16 GEMMs (dense and grouped MoE) against float64 on fresh random 4-bit weights, and against their twins.

Dequantization is exact, so the only error is the matmul's: fp32 activations (IEEE dots) within 1e-5 of the
largest |reference| of float64; bf16 activations (the dequantized weight rounded to bf16 for the dot on a GPU, kept
fp32 by the interpreter) within 1e-2 of it. Outputs are poisoned (NaN) before the kernels write them.
Without CUDA through the Triton interpreter at small sizes (groups 16 and 32, experts without rows first, middle
and last, tokens gathered); DeepSeek-V3 shapes (7168 x 2048 and 2048 x 7168, 256 experts, group 128) only on a GPU
(the interpreter took 48 s and 51 s for one row through each dense V3 shape on a 2-core CPU, far longer for the
256 experts: too slow for CI).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
from helpers import assert_close  # noqa: E402
from reference.w4a16 import (  # noqa: E402
    w4a16_gemm_torch,
    w4a16_moe_gemm_torch,
    w8a16_gemm_torch,
    w8a16_moe_gemm_torch,
)

from deepseek_mcp.kernels.aot import run_family, toolchain_available  # noqa: E402
from deepseek_mcp.kernels.platform import triton_available  # noqa: E402
from deepseek_mcp.kernels.w4a16 import w4a16_gemm, w4a16_moe_gemm, w8a16_gemm, w8a16_moe_gemm  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (minutes per shape in the interpreter)")


def int4_weight(lead: tuple[int, ...], n: int, k: int, group: int, scale_dtype=torch.float16):
    """Random codes, zero points and scales -> (qweight [*lead, N, K/8], scales, zeros, float64 W [*lead, N, K])."""
    u = torch.randint(0, 16, (*lead, n, k))
    z = torch.randint(0, 16, (*lead, n, k // group))
    s = (torch.rand(*lead, n, k // group) * 0.02 + 0.002).to(scale_dtype)
    w = (u - z.repeat_interleave(group, -1)).double() * s.double().repeat_interleave(group, -1)
    words = sum(u[..., j::8].long() << (4 * j) for j in range(8))  # code j of each 8 in bits 4j
    q = (words - (words >= 2**31).long() * 2**32).to(torch.int32)
    return q.to(DEV), s.to(DEV), z.to(torch.uint8).to(DEV), w


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """No NaN left (the poison was overwritten); max |got - ref| within TOL[dtype] of max |ref| (float64)."""
    got = got.double().cpu()
    assert not torch.isnan(got).any(), f"{what}: NaN left in the output"
    err, top = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= TOL[dtype] * top, f"{what}: max error {err:.3e} vs largest |reference| {top:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, group", [(1, 48, 64, 16), (5, 40, 96, 32), (33, 24, 48, 16)])
def test_gemm_matches_float64(m: int, n: int, k: int, group: int, dtype: torch.dtype) -> None:
    q, s, z, w = int4_weight((), n, k, group)
    x = torch.randn(m, k, device=DEV).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    got = w4a16_gemm(x, q, s, z, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = x.double().cpu() @ w.T
    check(got, ref, dtype, "w4a16_gemm")
    check(w4a16_gemm_torch(x, q, s, z), ref, dtype, "twin")


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _reference(xd: torch.Tensor, counts: list[int], w: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """float64 rows sorted by expert through each expert's weight (SwiGLU on the fused gate+up halves)."""
    outs, r0 = [], 0
    for e, c in enumerate(counts):
        y = xd[r0 : r0 + c] @ w[e].T
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = gate * torch.sigmoid(gate) * up
        outs.append(y)
        r0 += c
    return torch.cat(outs)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("counts, dtype", [([0, 3, 0, 5, 1, 0], torch.float32), ([2, 0, 17, 4], torch.bfloat16)])
def test_moe_gemm_matches_float64(counts: list[int], dtype: torch.dtype, swiglu: bool) -> None:
    e, n, k, group = len(counts), 48, 64, 16
    q, s, z, w = int4_weight((e,), n, k, group, torch.bfloat16)
    x = torch.randn(sum(counts), k, device=DEV).to(dtype)
    n_out = n // 2 if swiglu else n
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=dtype, device=DEV)
    act = "swiglu" if swiglu else None
    got = w4a16_moe_gemm(x, _offsets(counts), q, s, z, act, out=out)
    ref = _reference(x.double().cpu(), counts, w, swiglu)
    check(got, ref, dtype, "w4a16_moe_gemm")
    check(w4a16_moe_gemm_torch(x, _offsets(counts), q, s, z, act), ref, dtype, "twin")


def test_moe_gemm_gathers_token_rows() -> None:
    """x holds one row per token; sorted row r reads token order[r] // k, as after moe_align."""
    t, topk, e, n, k, group = 6, 2, 4, 32, 32, 16
    q, s, z, w = int4_weight((e,), n, k, group)
    x = torch.randn(t, k, device=DEV)
    idx = torch.stack([torch.randperm(e)[:topk] for _ in range(t)]).to(DEV)  # [T, k] distinct experts
    order = idx.flatten().argsort(stable=True)  # sorted row -> pair
    counts = torch.bincount(idx.flatten(), minlength=e).tolist()
    out = torch.full((t * topk, n // 2), float("nan"), device=DEV)
    got = w4a16_moe_gemm(x, _offsets(counts), q, s, z, "swiglu", out=out, gather=(order, topk))
    ref = _reference(x.double().cpu()[order.cpu() // topk], counts, w, True)
    check(got, ref, torch.float32, "gathered")


def test_bad_shapes_are_refused_naming_the_argument() -> None:
    q, s, z, _ = int4_weight((), 16, 32, 16)
    x = torch.randn(2, 32, device=DEV)
    with pytest.raises(ValueError, match="does not match K = 40"):
        w4a16_gemm(torch.randn(2, 40, device=DEV), q, s, z)
    with pytest.raises(ValueError, match="zeros has dtype int32"):
        w4a16_gemm(x, q, s, z.to(torch.int32))
    with pytest.raises(ValueError, match="scales .* not a whole number of groups"):
        w4a16_gemm(x, q, s[:, :0], z[:, :0])
    q3, s3, z3, _ = int4_weight((2,), 9, 32, 16)  # N = 9: no gate/up halves
    with pytest.raises(ValueError, match="swiglu needs the fused"):
        w4a16_moe_gemm(x, _offsets([1, 1]), q3, s3, z3, "swiglu")


def fp8_weight(lead: tuple[int, ...], n: int, k: int, swiglu: bool = False):
    """Random e4m3 [*lead, N, K] with fp32 128x128 block scales (for swiglu gate's blocks then up's) and its
    float64 dequantization, written from the block definition."""
    w = (torch.randn(*lead, n, k) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    halves = [(0, n // 2), (n // 2, n)] if swiglu else [(0, n)]
    rows = sum(-(-(r1 - r0) // 128) for r0, r1 in halves)
    s = torch.rand(*lead, rows, -(-k // 128)) * 2e-3 + 1e-4
    wd = torch.empty(*lead, n, k, dtype=torch.float64)
    srow = 0
    for r0, r1 in halves:
        blocks = torch.arange(r1 - r0) // 128 + srow
        wd[..., r0:r1, :] = w[..., r0:r1, :].double() * s.double()[..., blocks, :][..., torch.arange(k) // 128]
        srow += -(-(r1 - r0) // 128)
    return w.to(DEV), s.to(DEV), wd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_gemm_matches_float64(dtype: torch.dtype) -> None:
    """FP8 weights on GPUs without FP8 tensor cores: K and N past one 128 block, edge blocks partial."""
    w, s, wd = fp8_weight((), 136, 160)
    x = torch.randn(5, 160, device=DEV).to(dtype)
    out = torch.full((5, 136), float("nan"), dtype=dtype, device=DEV)
    ref = x.double().cpu() @ wd.T
    check(w8a16_gemm(x, w, s, out=out), ref, dtype, "w8a16_gemm")
    check(w8a16_gemm_torch(x, w, s), ref, dtype, "twin")


def test_w8a16_moe_gemm_matches_float64() -> None:
    """SwiGLU with I = 48, so up's scale blocks start at row 1 of the fused scales (not inside gate's block)."""
    counts = [3, 0, 6, 2]
    w, s, wd = fp8_weight((4,), 96, 160, swiglu=True)
    x = torch.randn(sum(counts), 160, device=DEV)
    out = torch.full((x.shape[0], 48), float("nan"), device=DEV)
    ref = _reference(x.double().cpu(), counts, wd, True)
    check(w8a16_moe_gemm(x, _offsets(counts), w, s, "swiglu", out=out), ref, torch.float32, "w8a16_moe_gemm")
    check(w8a16_moe_gemm_torch(x, _offsets(counts), w, s, "swiglu"), ref, torch.float32, "twin")
    w2, s2, wd2 = fp8_weight((4,), 40, 48)
    h = torch.randn(sum(counts), 48, device=DEV)
    check(w8a16_moe_gemm(h, _offsets(counts), w2, s2), _reference(h.double().cpu(), counts, wd2, False),
          torch.float32, "w8a16 down")


@needs_cuda
@pytest.mark.parametrize("n, k", [(2048, 7168), (7168, 2048)])
def test_v3_shapes_on_gpu(n: int, k: int) -> None:
    q, s, z, w = int4_weight((), n, k, 128, torch.bfloat16)
    for m in (1, 64, 512):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        ref = x.double().cpu() @ w.to(torch.bfloat16).double().T
        assert_close(w4a16_gemm(x, q, s, z), ref, what=f"w4a16_gemm {m}x{n}x{k}")


@needs_cuda
def test_v3_experts_on_gpu() -> None:
    """256 experts [2I = 4096, D = 7168] (random words: the float64 weights would not fit), 64 tokens x 8."""
    e, i, d, group, topk = 256, 2048, 7168, 128, 8
    counts = torch.bincount(torch.randint(0, e, (64 * topk,)), minlength=e).tolist()
    q = torch.randint(-(2**31), 2**31, (e, 2 * i, d // 8), dtype=torch.int32, device=DEV)
    s = (torch.rand(e, 2 * i, d // group, device=DEV) * 0.02 + 0.002).to(torch.bfloat16)
    z = torch.randint(0, 16, (e, 2 * i, d // group), dtype=torch.uint8, device=DEV)
    x = torch.randn(sum(counts), d, device=DEV, dtype=torch.bfloat16)
    out = torch.full((x.shape[0], i), float("nan"), dtype=torch.bfloat16, device=DEV)
    got = w4a16_moe_gemm(x, _offsets(counts), q, s, z, "swiglu", out=out)
    assert_close(got, w4a16_moe_gemm_torch(x.float(), _offsets(counts), q, s, z, "swiglu"), what="V3 experts")


@pytest.mark.skipif(not toolchain_available(), reason="needs triton's NVIDIA backend with its bundled ptxas")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_hopper_and_ampere_without_spills(arch: int) -> None:
    """Ahead-of-time builds for sm_90a and sm_80 at V3 shapes (group 128), 4-bit and W8A16 (FP8 weights, the
    path of GPUs below compute capability 8.9): decode and prefill tiles, SwiGLU with the gather and plain; no
    spills; Hopper's 128-row tiles use wgmma."""
    rows = {r[1]: r for r in run_family("w4a16", arch=arch)}
    assert len(rows) == 11 and not [r for r in rows.values() if r[2] == "FAILED:"], rows
    assert all(r[3] == "0" for r in rows.values()), rows
    if arch == 90:
        assert rows["128x64x64 w8 s3"][5] == rows["swiglu 128x64x64 w8 s3"][5] == "HGMMA", rows
