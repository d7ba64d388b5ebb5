"""The building blocks every layer uses: the runtime settings, Linear (activation dtype or FP8 e4m3 with 128x128
block scales), RMSNorm (with the residual add fused on the Triton path), and the SwiGLU MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mcp.inference.model import onednn
from deepseek_mcp.inference.model.layout import dequant_fp8

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Runtime:
    """How the model computes: activation dtype and which kernels run (set once at construction)."""

    dtype: torch.dtype = torch.bfloat16
    kernels: str = "torch"  # "torch" (the model's torch code) or "triton"
    scale_fmt: str | None = None  # activation scales for FP8 GEMM ("ue8m0" on V3.1)
    fp8_block: int = 128


@dataclass(frozen=True)
class Fp8Act:
    """An activation together with its FP8 copy, quantized per 1x128 group by the RMSNorm kernel that wrote it
    (Triton path), so the FP8 GEMMs reading it skip their own act_quant launch. x [T, K] in the activation
    dtype (what the MoE gate reads), q [T, K] e4m3, scale [T, ceil(K/128)] fp32."""

    x: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor


def plain(x: torch.Tensor | Fp8Act) -> torch.Tensor:
    return x.x if isinstance(x, Fp8Act) else x


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x W^T, with W in the activation dtype or FP8 e4m3 with 128x128 block scales."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.in_features, self.out_features, self.rt = in_features, out_features, rt
        wdtype = FP8_DTYPE if fp8 else rt.dtype
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=wdtype, device=device))
        if fp8:
            b = rt.fp8_block
            scale = torch.empty(-(-out_features // b), -(-in_features // b), dtype=torch.float32, device=device)
            self.weight_scale_inv = _frozen(scale)
        else:
            self.weight_scale_inv = None
        self.packed = False  # weight in oneDNN's layout (CPU, `pack_cpu_`)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.packed:
            return onednn.unpack(self.weight).to(dtype)
        if self.weight_scale_inv is None:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return dequant_fp8(self.weight, self.weight_scale_inv, self.rt.fp8_block, dtype)

    def pack_cpu_(self, dtype_ok: bool) -> None:
        """A dense CPU weight in the activation dtype reordered once into oneDNN's layout (inference/model/
        onednn.py); `dtype_ok` is `onednn.probe(dtype)`. Other weights stay as they are."""
        if self.weight_scale_inv is None and self.weight.dtype == self.rt.dtype and \
                onednn.supported(self.weight, dtype_ok):
            self.weight, self.packed = _frozen(onednn.pack(self.weight)), True

    @property
    def takes_fp8(self) -> bool:
        """Whether this layer's forward runs the FP8 GEMM (so an `Fp8Act` input saves its act_quant)."""
        return self.weight_scale_inv is not None and self.rt.kernels == "triton"

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        if self.takes_fp8:
            from deepseek_mcp.kernels.fp8 import fp8_gemm, fp8_linear

            if isinstance(x, Fp8Act):  # quantized by the norm before: the GEMM alone
                out = torch.empty(x.x.shape[0], self.out_features, dtype=x.x.dtype, device=x.x.device)
                return fp8_gemm(x.q, x.scale, self.weight, self.weight_scale_inv, out=out)
            return fp8_linear(x, self.weight, self.weight_scale_inv, self.rt.scale_fmt).to(x.dtype)
        x = plain(x)
        if self.packed and x.dtype == self.weight.dtype:
            return onednn.linear(x, self.weight)
        return F.linear(x, self.dense_weight(x.dtype))


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear whose output is the concatenation of `parts`' outputs (same input), or None where FP8 scale
    blocks would straddle a seam (every part but the last must end on a whole 128-row block)."""
    first = parts[0]
    fp8 = first.weight_scale_inv is not None
    if fp8 and any(p.out_features % first.rt.fp8_block for p in parts[:-1]):
        return None
    if any(p.in_features != first.in_features or (p.weight_scale_inv is not None) != fp8 for p in parts):
        return None
    fused = Linear(first.in_features, sum(p.out_features for p in parts), first.rt, fp8, torch.device("meta"))
    fused.weight = _frozen(torch.cat([p.weight for p in parts]))  # [sum N, K]
    if fp8:
        fused.weight_scale_inv = _frozen(torch.cat([p.weight_scale_inv for p in parts]))
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, rt: Runtime, device: torch.device):
        super().__init__()
        self.eps, self.rt = eps, rt
        self.weight = _frozen(torch.empty(dim, dtype=rt.dtype, device=device))
        self.quantize = False  # Triton path: also write the FP8 copy its FP8 consumers read (prepare_for_kernels_)

    def forward(self, x: torch.Tensor) -> torch.Tensor | Fp8Act:
        """x [T, D] -> weight * norm(x), normalized in fp32 and cast back before the weight (as the reference);
        an `Fp8Act` (the same values and their FP8 copy, one kernel) when `quantize` is set."""
        if self.rt.kernels == "triton":
            from deepseek_mcp.kernels.norm import rmsnorm

            if self.quantize:
                return Fp8Act(*rmsnorm(x, self.weight, self.eps, quant=True, scale_fmt=self.rt.scale_fmt))
            return rmsnorm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor | Fp8Act, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None: (norm(x), x). One kernel on the Triton path."""
        if residual is None:
            return self(x), x
        if self.rt.kernels == "triton":
            from deepseek_mcp.kernels.norm import rmsnorm_residual

            if self.quantize:
                y, h, q, s = rmsnorm_residual(x, residual, self.weight, self.eps, quant=True,
                                              scale_fmt=self.rt.scale_fmt)
                return Fp8Act(y, q, s), h
            return rmsnorm_residual(x, residual, self.weight, self.eps)
        residual = x + residual
        return self(residual), residual


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts (gate and up fused into one GEMM at load)."""

    def __init__(self, dim: int, inter: int, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.gate_proj = Linear(dim, inter, rt, fp8, device)
        self.up_proj = Linear(dim, inter, rt, fp8, device)
        self.down_proj = Linear(inter, dim, rt, fp8, device)
        self.gate_up_proj: Linear | None = None

    def fuse_gate_up_(self) -> None:
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj, self.gate_proj, self.up_proj = fused, None, None

    @property
    def takes_fp8(self) -> bool:
        return all(p is None or p.takes_fp8 for p in (self.gate_up_proj, self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

