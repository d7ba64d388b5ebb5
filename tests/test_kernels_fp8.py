"""FP8 kernels (act_quant, weight_dequant, fp8_gemm, fp8_linear) against their torch twins and float64.

Without CUDA the Triton kernels run in Triton's CPU interpreter on small shapes (N, K not multiples of 128);
with CUDA the same checks run natively, plus DeepSeek-V3 shapes. Outputs are poisoned with NaN first.
Tolerances: quantization is bit-exact against the twin; GEMM outputs (bf16) within 1e-2 relative (+1e-4 of the
largest magnitude) of a float64 product of the same dequantized operands.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
from helpers import assert_close
from reference.fp8 import (  # noqa: E402
    act_quant_torch,
    ceil_pow2_torch,
    fp8_gemm_torch,
    fp8_linear_torch,
    weight_dequant_torch,
)

from deepseek_mcp.kernels import platform  # noqa: E402
from deepseek_mcp.kernels.aot import run_family, toolchain_available  # noqa: E402
from deepseek_mcp.kernels.fp8 import act_quant, fp8_gemm, fp8_linear, weight_dequant  # noqa: E402
from deepseek_mcp.kernels.util import FP8_DTYPE  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(not platform.triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




def nan_like(shape, dtype, device=DEV) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rand_weight(n: int, k: int, device=DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight [N, K] plus positive fp32 block scales [ceil(N/128), ceil(K/128)] (UE8M0-like and not)."""
    w = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8_DTYPE)
    s = torch.rand(-(-n // 128), -(-k // 128), device=device) * 1e-3 + 1e-4
    return w, s


def dequant_act(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    k = y.shape[-1]
    return y.double() * s.double().repeat_interleave(128, -1)[..., :k]


# ---------------------------------------------------------------------------------------------- act_quant


@needs_triton
@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (2, 3, 200), (64, 1000)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_matches_twin_bitwise(shape, scale_fmt, dtype):
    x = (torch.randn(shape, device=DEV) * torch.logspace(-5, 3, shape[-1], device=DEV)).to(dtype)
    x.view(-1, shape[-1])[0, :128] = 0  # an all-zero group: scale from the 1e-4 floor
    kb = -(-shape[-1] // 128)
    y = nan_like(shape, FP8_DTYPE)
    s = nan_like((*shape[:-1], kb), torch.float32)
    y_out, s_out = act_quant(x, 128, scale_fmt, out=(y, s))
    assert y_out.data_ptr() == y.data_ptr() and s_out.data_ptr() == s.data_ptr()
    y_ref, s_ref = act_quant_torch(x, 128, scale_fmt)
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert torch.equal(y.view(torch.uint8).cpu(), y_ref.view(torch.uint8).cpu())
    # against float64: scale = max(amax, 1e-4) / 448 (rounded up to 2^k for UE8M0); e4m3 rounding error is at
    # most half a step: 2^-4 relative for normals, 2^-10 * scale in the subnormal range
    xg = torch.nn.functional.pad(x.double().cpu(), (0, kb * 128 - shape[-1])).unflatten(-1, (kb, 128))
    expect = xg.abs().amax(-1).clamp(min=1e-4) / 448
    if scale_fmt == "ue8m0":
        mant, _ = torch.frexp(s.cpu())
        assert torch.all(mant == 0.5), "UE8M0 scales must be exact powers of two"
        assert torch.all(s.cpu().double() >= expect) and torch.all(s.cpu().double() < 2 * expect)
    else:
        assert torch.allclose(s.cpu().double(), expect, rtol=1e-6, atol=0)
    err = (dequant_act(y.cpu(), s.cpu()) - x.double().cpu()).abs()
    bound = x.double().cpu().abs() * 2**-4 + s.cpu().double().repeat_interleave(128, -1)[..., : shape[-1]] * 2**-10
    assert torch.all(err <= bound * (1 + 1e-9))


@needs_triton
def test_act_quant_rounding_sweep_ties_to_even_and_saturation():
    """Scale exactly 1 (448 in every group), then every e4m3 midpoint, its neighbours and subnormals."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values  # the non-negative e4m3 values
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, mids * (1 + 2**-20), mids * (1 - 2**-20), grid, torch.rand(2000) * 2**-6])
    vals = torch.cat([vals, -vals])
    n = -(-vals.numel() // 127) * 127
    x = torch.nn.functional.pad(vals, (0, n - vals.numel())).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1).to(DEV)  # [G, 128]
    y, s = act_quant(x)
    y_ref, s_ref = act_quant_torch(x)
    assert torch.all(s.cpu() == 1.0)
    assert torch.equal(y.view(torch.uint8).cpu(), y_ref.view(torch.uint8).cpu())
    # saturation: a value rounding past 448 relative to its group's scale still maps to +-448, never NaN
    big = torch.tensor([[448.0] + [-448.0] * 127], device=DEV)
    yb, _ = act_quant(big)
    assert not torch.isnan(yb.float()).any()


def test_act_quant_twin_properties_large():
    x = torch.randn(300, 2000) * 3
    for fmt in (None, "ue8m0"):
        y, s = act_quant_torch(x, 128, fmt)
        assert y.dtype == FP8_DTYPE and s.shape == (300, 16) and s.dtype == torch.float32
        rel = (dequant_act(y, s) - x.double()).norm() / x.double().norm()
        assert rel < 0.05
    assert torch.equal(ceil_pow2_torch(torch.tensor([1.0, 1.5, 0.75, 2**-20 * 1.0001])),
                       torch.tensor([1.0, 2.0, 1.0, 2**-19]))


def test_act_quant_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant_torch(torch.randn(2, 128), 128, "e8m0")
    with pytest.raises(ValueError, match="power of two"):
        act_quant_torch(torch.randn(2, 128), 100)
    with pytest.raises(ValueError, match=r"out\[1\]"):
        act_quant_torch(torch.randn(2, 128), out=(torch.empty(2, 128, dtype=FP8_DTYPE), torch.empty(2, 2)))


# ------------------------------------------------------------------------------------------ weight_dequant


@needs_triton
@pytest.mark.parametrize("n,k", [(128, 128), (200, 300), (1, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_dequant_matches_twin(n, k, dtype):
    w, s = rand_weight(n, k)
    out = nan_like((n, k), dtype)
    weight_dequant(w, s, 128, dtype, out=out)
    ref = weight_dequant_torch(w, s, 128, dtype)
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:  # the interpreter truncates to bf16 instead of rounding: one bf16 step
        assert_close(out, ref, rtol=2**-7, what="weight_dequant bf16")
    with pytest.raises(ValueError, match="scale_inv shape"):
        weight_dequant(w, s[:, :1] if s.shape[1] > 1 else s[:, :0])


# -------------------------------------------------------------------------------------------------- GEMM


def gemm_inputs(m: int, n: int, k: int, scale_fmt=None):
    a, a_s = act_quant_torch(torch.randn(m, k, device=DEV), 128, scale_fmt)
    b, b_s = rand_weight(n, k)
    ref = dequant_act(a, a_s) @ weight_dequant_torch(b, b_s).double().T  # [M, N] float64
    return a, a_s, b, b_s, ref


@needs_triton
@pytest.mark.parametrize("m", [1, 7, 64, 333])
def test_fp8_gemm_against_float64_and_twin(m):
    n, k = (200, 300) if not CUDA else (1000, 1500)
    a, a_s, b, b_s, ref = gemm_inputs(m, n, k, "ue8m0")
    out = nan_like((m, n), torch.bfloat16)
    assert fp8_gemm(a, a_s, b, b_s, out=out) is out
    assert_close(out, ref, what=f"fp8_gemm m={m}")
    assert_close(out, fp8_gemm_torch(a, a_s, b, b_s), what="fp8_gemm vs twin")
    out32 = nan_like((m, n), torch.float32)
    assert_close(fp8_gemm(a, a_s, b, b_s, out=out32), ref, rtol=1e-5, what="fp32 out")


@needs_triton
@pytest.mark.parametrize("cfg", [
    {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "SPLIT_K": 2, "GROUP_M": 1},
    {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 1, "GROUP_M": 2},
])
def test_fp8_gemm_explicit_configs(cfg):
    """Decode (split-K) and prefill tilings the autotuner may pick, each checked on its own."""
    from deepseek_mcp.kernels.fp8_triton import launch_fp8_gemm

    m, n, k = 70, 260, 520  # 2 full + 1 partial row tiles at 32, 3 column blocks of 128, 5 K steps (1 partial)
    a, a_s, b, b_s, ref = gemm_inputs(m, n, k)
    out = nan_like((m, n), torch.bfloat16)
    launch_fp8_gemm(a, a_s, b, b_s, out, config=cfg)
    assert_close(out, ref, what=str(cfg))


def test_split_k_heuristic():
    from deepseek_mcp.kernels.fp8_triton import split_k_for

    assert split_k_for(1, 24576, 1536, 132) == 1  # enough column tiles already
    assert split_k_for(1, 2112, 7168, 132) == 8  # 33 column tiles -> 264 programs, 7 K steps each
    assert split_k_for(4096, 2112, 7168, 132) == 1  # 544 tiles of 128 x 128 fill the GPU
    assert split_k_for(128, 2112, 7168, 132) == 8  # 17 tiles -> 136 programs, 7 K steps each
    assert split_k_for(1, 64, 256, 132) == 1  # too few K steps to split


@needs_triton
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_linear(lead, scale_fmt):
    n, k = 150, 260
    x = torch.randn(*lead, k, device=DEV, dtype=torch.bfloat16)
    w, ws = rand_weight(n, k)
    out = nan_like((*lead, n), torch.bfloat16)
    y = fp8_linear(x, w, ws, scale_fmt, out=out)
    assert y.shape == (*lead, n) and y.dtype == torch.bfloat16
    xq, xs = act_quant_torch(x, 128, scale_fmt)
    ref = dequant_act(xq, xs) @ weight_dequant_torch(w, ws).double().T
    assert_close(out, ref, what="fp8_linear vs same dequantized inputs")
    assert_close(out, fp8_linear_torch(x, w, ws, scale_fmt), what="fp8_linear vs twin")
    exact = x.double() @ weight_dequant_torch(w, ws).double().T  # unquantized activations
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.1


def test_fp8_twins_large_against_float64():
    a, a_s = act_quant_torch(torch.randn(256, 1500))
    b, b_s = rand_weight(1000, 1500, device="cpu")
    ref = dequant_act(a, a_s) @ weight_dequant_torch(b, b_s).double().T
    assert_close(fp8_gemm_torch(a, a_s, b, b_s), ref, what="fp8_gemm_torch")
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm_torch(a, a_s, b, b_s[:, :-1])
    with pytest.raises(ValueError, match="disagree on K"):
        fp8_gemm_torch(a, a_s, b[:, :-1], b_s)


@needs_triton
def test_wrappers_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, a_s = act_quant_torch(torch.randn(2, 128))
    b, b_s = rand_weight(128, 128, device="cpu")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fp8_gemm(a, a_s, b, b_s)


# ---------------------------------------------------------------------------------------------- backend


def test_backend_selection():
    cpu = torch.device("cpu")
    assert platform.select_kernels(cpu, None) == "torch"
    assert platform.select_kernels(cpu, "auto") == "torch"
    assert platform.select_kernels(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="not one of"):
        platform.select_kernels(cpu, "cuda")
    assert not platform.fp8_supported(cpu)
    notice = platform.fp8_unsupported_notice(cpu)
    assert "8.9" in notice and "dequantized" in notice and "\n" not in notice
    if CUDA and platform.triton_available():
        assert platform.select_kernels(torch.device("cuda"), None) == "triton"


# ------------------------------------------------------------------------------------- GPU, V3 shapes


@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 16, 128, 4096])
@pytest.mark.parametrize("n,k", [(24576, 1536), (7168, 16384), (2112, 7168), (7168, 2048)])
def test_fp8_gemm_v3_shapes_cuda(m, n, k):
    a, a_s = act_quant(torch.randn(m, k, device=DEV, dtype=torch.bfloat16), 128, "ue8m0")
    b, b_s = rand_weight(n, k)
    out = nan_like((m, n), torch.bfloat16)
    fp8_gemm(a, a_s, b, b_s, out=out)
    ref = dequant_act(a, a_s) @ weight_dequant_torch(b, b_s).double().T
    assert_close(out, ref, what=f"V3 gemm {m}x{n}x{k}")


@pytest.mark.skipif(not toolchain_available(), reason="needs triton's NVIDIA backend with its bundled ptxas")
def test_fp8_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time build for sm_90a (what the interpreter cannot check): every kernel compiles, and the
    prefill-size GEMM tile runs on Hopper fp8 wgmma (QGMMA) without spilling."""
    rows = {(r[0], r[1]): r for r in run_family("fp8")}
    assert not [r for r in rows.values() if r[2] == "FAILED:"], rows
    assert {"act_quant_kernel", "weight_dequant_kernel", "fp8_gemm_kernel", "splitk_reduce_kernel"} <= {
        name for name, _ in rows}
    big = rows[("fp8_gemm_kernel", "128x128 w8 s4 split1")]
    assert big[5] == "QGMMA" and big[3] == "0", big
