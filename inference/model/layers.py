"""The building blocks every layer uses: the runtime settings, Linear (activation dtype or FP8 e4m3 with 128x128
block scales) and its column- and row-parallel forms, the vocabulary-parallel embedding and output head, RMSNorm
(with the residual add fused on the Triton path), and the SwiGLU MLP. Each is built for a `TPContext` (one device
by default) and holds only its rank's slice (parallel.py says how the model splits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mcp.inference.model import onednn
from deepseek_mcp.inference.model.int4 import dequant_int4, int4_params, split_int4
from deepseek_mcp.inference.model.layout import dequant_fp8
from deepseek_mcp.inference.model.parallel import ONE_DEVICE, Shard, TPContext, padded_vocab, scale_shard, split

if TYPE_CHECKING:
    from deepseek_mcp.inference.model.quant_formats import Int4Scheme

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Runtime:
    """How the model computes: activation dtype and which kernels run (set once at construction)."""

    dtype: torch.dtype = torch.bfloat16
    kernels: str = "torch"  # "torch" (the model's torch code) or "triton"
    scale_fmt: str | None = None  # activation scales for FP8 GEMM ("ue8m0" on V3.1)
    fp8_block: int = 128
    int4: Int4Scheme | None = None  # 4-bit checkpoint: which Linears are 4-bit, their group size (int4.py)
    fp8_gemm: bool = True  # False (Triton on GPUs below compute capability 8.9): FP8 weights run the W8A16 kernels

    @property
    def w8a16(self) -> bool:
        """FP8 weights dequantized in registers by the weight-only kernels (kernels/w4a16.py), bf16 activations."""
        return self.kernels == "triton" and not self.fp8_gemm and self.fp8_block == 128

    def int4_group(self, module: str) -> int:
        """The quantization group size of a 4-bit Linear named `module` in the checkpoint, 0 if not 4-bit."""
        return self.int4.group_size if self.int4 is not None and self.int4.quantizes(module) else 0


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
    """y = x W^T, with W in the activation dtype, FP8 e4m3 with 128x128 block scales, or (`group` > 0) 4-bit codes
    with per-group scales and zero points (int4.py: `weight` int32 [N, K/8], `weight_scale` (the
    checkpoint's dtype) and `weight_zero` uint8 [N, K/G])."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device,
                 group: int = 0, name: str = "weight"):
        super().__init__()
        self.in_features, self.out_features, self.rt = in_features, out_features, rt
        self.int4_group = group
        self.weight_scale = self.weight_zero = None
        wdtype = FP8_DTYPE if fp8 else rt.dtype
        if group:
            q, scale, zero = int4_params((), out_features, in_features, group, device, name,
                                         rt.int4.scale_torch_dtype if rt.int4 else torch.float16)
            self.weight, self.weight_scale, self.weight_zero = _frozen(q), _frozen(scale), _frozen(zero)
            fp8 = False
        else:
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
        if self.int4_group:
            return dequant_int4(self.weight, self.weight_scale, self.weight_zero, dtype)
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
        return self.weight_scale_inv is not None and self.rt.kernels == "triton" and not self.rt.w8a16

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        if self.int4_group and self.rt.kernels == "triton":  # 4-bit codes dequantized in registers
            from deepseek_mcp.kernels.w4a16 import w4a16_gemm

            x = plain(x)
            return w4a16_gemm(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.weight_scale,
                              self.weight_zero)
        if self.weight_scale_inv is not None and self.rt.w8a16:  # FP8 weights without FP8 tensor cores
            from deepseek_mcp.kernels.w4a16 import w8a16_gemm

            x = plain(x)
            return w8a16_gemm(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.weight_scale_inv)
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


class ColumnParallelLinear(Linear):
    """Holds output rows [rank * n, (rank + 1) * n) of the full [out, in] weight; output [.., n], no collective."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device,
                 tp: TPContext, name: str = ""):
        group = rt.int4_group(name)
        shard, fp8 = (split_int4(out_features, tp, 0, group, name), False) if group else \
            split(out_features, tp, 0, fp8, rt.fp8_block)
        super().__init__(in_features, shard.size, rt, fp8, device, group, name)
        _mark(self, shard)


class RowParallelLinear(Linear):
    """Holds input columns [rank * n, (rank + 1) * n) of the full [out, in] weight; the partial outputs are
    all-reduced unless `reduce` is False (the MoE sums its experts' partial outputs first)."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device,
                 tp: TPContext, reduce: bool = True, name: str = ""):
        group = rt.int4_group(name)
        shard, fp8 = (split_int4(in_features, tp, 1, group, name), False) if group else \
            split(in_features, tp, 1, fp8, rt.fp8_block)
        super().__init__(shard.size, out_features, rt, fp8, device, group, name)
        _mark(self, shard)
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        y = super().forward(x)  # [T, out] partial sum over this rank's columns
        return self.tp.all_reduce(y) if self.reduce else y


def _mark(linear: Linear, shard: Shard) -> None:
    """Tag the weight (and the scale blocks of an FP8 slice aligned to them) with the checkpoint slice held."""
    linear.weight.shard = shard
    if linear.weight_scale_inv is not None:
        linear.weight_scale_inv.shard = scale_shard(shard, linear.rt.fp8_block)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of the vocabulary padded to N * n; ids elsewhere look up zeros, and the
    all-reduce fills every row from the rank that holds it."""

    def __init__(self, vocab_size: int, dim: int, rt: Runtime, device: torch.device, tp: TPContext):
        super().__init__()
        n = padded_vocab(vocab_size, tp.world_size) // tp.world_size
        self.start, self.rows, self.tp = tp.rank * n, n, tp
        self.weight = _frozen(torch.zeros(n, dim, dtype=rt.dtype, device=device))
        self.weight.shard = Shard(0, self.start, max(0, min(n, vocab_size - self.start)), vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:  # every id is here: nothing to mask or sum
            return F.embedding(ids, self.weight)  # [T, D]
        local = ids - self.start  # [T]
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, D]
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))


class ParallelLMHead(Linear):
    """Column-parallel over the padded vocabulary; rank 0 gathers the full logits [N, V], other ranks return
    their own columns (which nobody reads)."""

    def __init__(self, dim: int, vocab_size: int, rt: Runtime, device: torch.device, tp: TPContext):
        n = padded_vocab(vocab_size, tp.world_size) // tp.world_size
        super().__init__(dim, n, rt, False, device)
        start = tp.rank * n
        self.weight.shard = Shard(0, start, max(0, min(n, vocab_size - start)), vocab_size)
        if n * tp.world_size != vocab_size:
            nn.init.zeros_(self.weight)  # padding rows the checkpoint does not fill
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)  # [N, V_pad / world]
        parts = self.tp.gather_to_first(local.contiguous())
        if parts is None:
            return local
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))[:, : self.vocab_size]


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear whose output is the concatenation of `parts`' outputs (same input), or None where FP8 scale
    blocks would straddle a seam (every part but the last must end on a whole 128-row block)."""
    first = parts[0]
    if first.int4_group:  # 4-bit: codes, scales and zero points stacked row-wise alike
        if any(p.int4_group != first.int4_group or p.in_features != first.in_features for p in parts):
            return None
        fused = Linear(first.in_features, sum(p.out_features for p in parts), first.rt, False,
                       torch.device("meta"), first.int4_group)
        for attr in ("weight", "weight_scale", "weight_zero"):
            setattr(fused, attr, _frozen(torch.cat([getattr(p, attr) for p in parts])))
        return fused
    fp8 = first.weight_scale_inv is not None
    if fp8 and any(p.out_features % first.rt.fp8_block for p in parts[:-1]):
        return None
    if any(p.in_features != first.in_features or (p.weight_scale_inv is not None) != fp8 or p.int4_group
           for p in parts):
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
    """SwiGLU feed-forward: the dense layers and the shared experts (gate and up fused into one GEMM at load).
    Split along the intermediate size; the down projection's partial sums are all-reduced unless `reduce` is
    False (a shared expert, summed with the routed ones first)."""

    def __init__(self, dim: int, inter: int, rt: Runtime, fp8: bool, device: torch.device,
                 tp: TPContext = ONE_DEVICE, reduce: bool = True, prefix: str = ""):
        super().__init__()
        p = f"{prefix}." if prefix else ""  # the checkpoint's module names (which ones are 4-bit)
        self.gate_proj = ColumnParallelLinear(dim, inter, rt, fp8, device, tp, name=p and p + "gate_proj")
        self.up_proj = ColumnParallelLinear(dim, inter, rt, fp8, device, tp, name=p and p + "up_proj")
        self.down_proj = RowParallelLinear(inter, dim, rt, fp8, device, tp, reduce=reduce,
                                           name=p and p + "down_proj")
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

