"""DeepSeekMoE: the gate (sigmoid scores, bias-corrected group-limited top-k), the routed experts stacked per
projection, and the shared expert beside them (stacked as one more routed expert on the Triton path). Under
tensor parallelism every rank holds every expert's slice of the intermediate size and the layer all-reduces its
output once (parallel.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.int4 import dequant_int4, int4_params, split_int4
from deepseek_mcp.inference.model.layers import FP8_DTYPE, MLP, Fp8Act, Runtime, _frozen, plain
from deepseek_mcp.inference.model.layout import dequant_fp8, stack_shared_expert
from deepseek_mcp.inference.model.parallel import ONE_DEVICE, ParallelConfigError, TPContext, scale_shard, split


def route(scores_logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig, shared_expert: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing on the torch path (kernels/router.py; the Triton path runs `moe_gate_route`): sigmoid
    scores, bias for selection only, group-limited top-k.

    scores_logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k] int64). Unselected groups are masked
    with -inf (as DeepSeek's reference), so a negative biased score in a chosen group still beats them.
    """
    from deepseek_mcp.kernels.router import moe_route_torch

    return moe_route_torch(scores_logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, cfg.routed_scaling_factor, shared_expert=shared_expert)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, device: torch.device):
        super().__init__()
        self.cfg, self.rt = cfg, rt
        self.shared_expert = False  # route every token to expert E too (MoE.fuse_shared_expert_)
        self.weight = _frozen(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=rt.dtype, device=device))
        self.e_score_correction_bias = _frozen(torch.empty(cfg.n_routed_experts, dtype=torch.float32, device=device))

    def prepare_(self) -> None:
        """The router runs in fp32: cast its weight once at load, not every step."""
        self.weight = _frozen(self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights, expert ids) [T, k] each (k + 1 with the shared expert stacked)."""
        cfg = self.cfg
        if self.rt.kernels == "triton":  # the fp32 GEMM reading x as it is, then the routing: two launches
            from deepseek_mcp.kernels.router import moe_gate_route

            return moe_gate_route(x, self.weight, self.e_score_correction_bias, cfg.n_group, cfg.topk_group,
                                  cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                                  shared_expert=self.shared_expert)
        logits = F.linear(x.float(), self.weight.float())  # [T, E] (.float() is free once prepared)
        return route(logits, self.e_score_correction_bias, cfg, self.shared_expert)


class Experts(nn.Module):
    """The routed experts' weights stacked per projection: [E, I, D] (gate, up) and [E, D, I] (down), I this
    rank's slice of the intermediate size (gate/up rows, down columns; the checkpoint slice is each weight's
    `shard`). A slice cutting FP8 scale blocks is held dequantized in the activation dtype. 4-bit experts
    (int4.py) hold codes [E, N, K/8] int32 with `{name}_scale` (16-bit) and `{name}_zero` uint8 [E, N, K/G]."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext = ONE_DEVICE,
                 prefix: str = ""):
        super().__init__()
        self.rt = rt
        e, d, b = cfg.n_routed_experts, cfg.hidden_size, rt.fp8_block
        groups = {rt.int4_group(f"{prefix}.{j}.{proj}") if prefix else 0
                  for j in range(e) for proj in ("gate_proj", "up_proj", "down_proj")}
        if len(groups) > 1:
            raise ParallelConfigError(f"{prefix}: the quantization_config leaves some routed experts' projections "
                                      "unquantized and quantizes others; stacked experts must all be 4-bit or none")
        self.int4_group = groups.pop()
        if self.int4_group:
            self._int4_init(cfg, tp, device, f"{prefix}.*")
            return
        rows, fp8 = split(cfg.moe_intermediate_size, tp, 0, fp8, b)  # of each expert's gate/up [I, D]
        cols = replace(rows, dim=1)  # of each expert's down [D, I]
        i = rows.size
        wdtype = FP8_DTYPE if fp8 else rt.dtype
        for name, (n, k), shard in (("gate_proj", (i, d), rows), ("up_proj", (i, d), rows),
                                    ("down_proj", (d, i), cols)):
            setattr(self, name, _frozen(torch.empty(e, n, k, dtype=wdtype, device=device)))
            getattr(self, name).shard = shard
            scale = torch.empty(e, -(-n // b), -(-k // b), dtype=torch.float32, device=device) if fp8 else None
            setattr(self, name + "_scale_inv", _frozen(scale) if fp8 else None)
            if fp8:
                getattr(self, name + "_scale_inv").shard = scale_shard(shard, b)

    def _int4_init(self, cfg: ModelConfig, tp: TPContext, device: torch.device, what: str) -> None:
        e, d, i, g = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, self.int4_group
        rows = split_int4(i, tp, 0, g, f"{what}.gate_proj/up_proj")  # of each expert's gate/up [I, D]
        cols = split_int4(i, tp, 1, g, f"{what}.down_proj")  # of each expert's down [D, I]
        for name, (n, k), shard in (("gate_proj", (rows.size, d), rows), ("up_proj", (rows.size, d), rows),
                                    ("down_proj", (d, cols.size), cols)):
            q, scale, zero = int4_params((e,), n, k, g, device, f"{what}.{name}", self.rt.int4.scale_torch_dtype)
            setattr(self, name, _frozen(q))
            setattr(self, name + "_scale", _frozen(scale))
            setattr(self, name + "_zero", _frozen(zero))
            setattr(self, name + "_scale_inv", None)
            getattr(self, name).shard = shard

    def _weights(self, name: str, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weights of the given experts, dequantized together: [A, N, K]."""
        if self.int4_group:
            return dequant_int4(getattr(self, name)[experts], getattr(self, name + "_scale")[experts],
                                getattr(self, name + "_zero")[experts], dtype)
        w = getattr(self, name)[experts]
        scale = getattr(self, name + "_scale_inv")
        if scale is None:
            return w if w.dtype == dtype else w.to(dtype)
        return dequant_fp8(w, scale[experts], self.rt.fp8_block, dtype)

    def _all_experts(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Torch path, dense weights, batches reaching most experts: all experts on all tokens, weight 0 if unused."""
        xe = x[None].expand(self.gate_proj.shape[0], -1, -1)  # [E, T, D]
        h = F.silu(torch.bmm(xe, self.gate_proj.transpose(1, 2))) * torch.bmm(xe, self.up_proj.transpose(1, 2))
        ys = torch.bmm(h, self.down_proj.transpose(1, 2))  # [E, T, D]
        w = torch.zeros(x.shape[0], ys.shape[0], dtype=torch.float32, device=x.device).scatter_(1, idx, weights)
        return torch.einsum("etd,te->td", ys.float(), w).to(x.dtype)  # [T, D]

    def fuse_gate_up_(self) -> None:
        """For the grouped GEMM: gate and up as one [E, 2I, D] weight (scales: gate's blocks, then up's; 4-bit:
        codes, scales and zero points stacked alike)."""
        if self.int4_group:
            for s in ("", "_scale", "_zero"):
                fused = torch.cat((getattr(self, "gate_proj" + s), getattr(self, "up_proj" + s)), dim=1)
                setattr(self, "gate_up_proj" + s, _frozen(fused))  # [E, 2I, D/8] / [E, 2I, D/G]
                setattr(self, "gate_proj" + s, None)
                setattr(self, "up_proj" + s, None)
            self.gate_up_proj_scale_inv = None
            return
        self.gate_up_proj = _frozen(torch.cat((self.gate_proj, self.up_proj), dim=1))
        if self.gate_proj_scale_inv is not None:
            self.gate_up_proj_scale_inv = _frozen(torch.cat((self.gate_proj_scale_inv, self.up_proj_scale_inv), 1))
        else:
            self.gate_up_proj_scale_inv = None
        self.gate_proj = self.up_proj = self.gate_proj_scale_inv = self.up_proj_scale_inv = None

    @property
    def takes_fp8(self) -> bool:
        return self.down_proj_scale_inv is not None and self.rt.kernels == "triton" and not self.rt.w8a16

    def forward(self, x: torch.Tensor | Fp8Act, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/idx [T, k] -> [T, D]: rows sorted by expert; only experts with rows do work."""
        t, k = idx.shape
        if self.rt.kernels == "triton":  # the sort, 2 grouped GEMMs, the combine; nothing reads the device
            from deepseek_mcp.kernels.moe import moe_grouped_gemm
            from deepseek_mcp.kernels.moe_align import moe_align
            from deepseek_mcp.kernels.router import moe_combine

            # [E + 1] first row per expert (E + 1 with the shared expert stacked), [T*k] sorted row -> pair,
            # [T*k] pair -> sorted row: one launch (the aten sort past 4096 pairs)
            offsets, order, inv = moe_align(idx, self.down_proj.shape[0])
            if self.int4_group:  # 4-bit experts dequantized in registers
                from deepseek_mcp.kernels.w4a16 import w4a16_moe_gemm

                h = w4a16_moe_gemm(plain(x), offsets, self.gate_up_proj, self.gate_up_proj_scale,
                                   self.gate_up_proj_zero, "swiglu", gather=(order, k))  # [T*k, I]
                ys = w4a16_moe_gemm(h, offsets, self.down_proj, self.down_proj_scale, self.down_proj_zero)
                return moe_combine(ys, weights, order, inv=inv, valid_rows=offsets[-1:])  # [T, D]
            if self.down_proj_scale_inv is not None and self.rt.w8a16:  # FP8 experts without FP8 tensor cores
                from deepseek_mcp.kernels.w4a16 import w8a16_moe_gemm

                h = w8a16_moe_gemm(plain(x), offsets, self.gate_up_proj, self.gate_up_proj_scale_inv, "swiglu",
                                   gather=(order, k))  # [T*k, I]
                ys = w8a16_moe_gemm(h, offsets, self.down_proj, self.down_proj_scale_inv)
                return moe_combine(ys, weights, order, inv=inv, valid_rows=offsets[-1:])  # [T, D]
            xq, xs = (x.q, x.scale) if isinstance(x, Fp8Act) else (x, None)  # quantized by the norm before
            h = moe_grouped_gemm(xq, offsets, self.gate_up_proj, self.gate_up_proj_scale_inv, "swiglu",
                                 scale_fmt=self.rt.scale_fmt, gather=(order, k), x_scale=xs)  # [T*k, I]
            ys = moe_grouped_gemm(h, offsets, self.down_proj, self.down_proj_scale_inv, scale_fmt=self.rt.scale_fmt)
            # rows from offsets[E] on (ids outside [0, E), which the gate never gives) would be unwritten: skipped
            return moe_combine(ys, weights, order, inv=inv, valid_rows=offsets[-1:])  # [T, D]
        x = plain(x)
        flat = idx.flatten()  # [T*k]
        n_experts = self.down_proj.shape[0]
        dense = self.gate_proj_scale_inv is None and not self.int4_group
        if dense and t * k >= n_experts:  # most experts have rows: all at once
            return self._all_experts(x, weights, idx)
        order = flat.argsort(stable=True)
        xs = x[order // k]  # [T*k, D]
        counts = torch.bincount(flat, minlength=n_experts)  # [E]
        if dense:  # views of the stacked weights, nothing copied per step
            used = [(e, n) for e, n in enumerate(counts.tolist()) if n]  # (expert, rows)
            w_gate, w_up, w_down = self.gate_proj, self.up_proj, self.down_proj
        else:  # FP8 or 4-bit on the torch path: the active experts dequantized together
            active = counts.nonzero().flatten()  # [A]
            used = list(enumerate(counts[active].tolist()))
            w_gate = self._weights("gate_proj", active, x.dtype)  # [A, I, D]
            w_up = self._weights("up_proj", active, x.dtype)  # [A, I, D]
            w_down = self._weights("down_proj", active, x.dtype)  # [A, D, I]
        ys = torch.empty_like(xs)
        start = 0
        for j, n in used:
            seg = xs[start : start + n]
            h = F.silu(F.linear(seg, w_gate[j])) * F.linear(seg, w_up[j])
            ys[start : start + n] = F.linear(h, w_down[j])
            start += n
        from deepseek_mcp.kernels.router import moe_combine_torch

        return moe_combine_torch(ys, weights, order)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext = ONE_DEVICE,
                 prefix: str = ""):
        super().__init__()
        self.gate = Gate(cfg, rt, device)  # replicated: every rank routes every token
        self.experts = Experts(cfg, rt, fp8, device, tp, f"{prefix}.experts" if prefix else "")
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, rt, fp8, device, tp, reduce=False,
                                  prefix=f"{prefix}.shared_experts" if prefix else "") \
            if cfg.n_shared_experts else None
        self.tp = tp

    def fuse_shared_expert_(self) -> None:
        """Triton path: the shared expert becomes routed expert E, taken by every token with weight 1, so the
        grouped GEMMs and the combine do its work (7 launches fewer per layer). Only where it has the routed
        experts' shape (n_shared_experts = 1, as V3) and its gate + up are fused."""
        shared, ex = self.shared_experts, self.experts
        if shared is None or shared.gate_up_proj is None or ex.gate_up_proj is None:
            return
        if shared.gate_up_proj.weight.shape != ex.gate_up_proj.shape[1:]:
            return
        if ex.int4_group or shared.gate_up_proj.int4_group:  # 4-bit: codes, scales and zero points alike
            if ex.int4_group != shared.gate_up_proj.int4_group or ex.int4_group != shared.down_proj.int4_group:
                return
            for name, linear in (("gate_up_proj", shared.gate_up_proj), ("down_proj", shared.down_proj)):
                for s, attr in (("", "weight"), ("_scale", "weight_scale"), ("_zero", "weight_zero")):
                    stacked = torch.cat((getattr(ex, name + s), getattr(linear, attr)[None]))  # [E + 1, ...]
                    setattr(ex, name + s, _frozen(stacked))
            self.shared_experts, self.gate.shared_expert = None, True
            return
        ex.gate_up_proj, ex.gate_up_proj_scale_inv = stack_shared_expert(
            ex.gate_up_proj, ex.gate_up_proj_scale_inv, shared.gate_up_proj)
        ex.down_proj, ex.down_proj_scale_inv = stack_shared_expert(ex.down_proj, ex.down_proj_scale_inv,
                                                                   shared.down_proj)
        self.shared_experts, self.gate.shared_expert = None, True

    @property
    def takes_fp8(self) -> bool:
        """Whether every reader of the input but the gate runs the FP8 GEMM (the norm before then quantizes)."""
        return self.experts.takes_fp8 and (self.shared_experts is None or self.shared_experts.takes_fp8)

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:
        weights, idx = self.gate(plain(x))  # [T, k] each (k + 1 with the shared expert stacked last)
        y = self.experts(x, weights, idx)  # [T, D] (partial: this rank's slice of every expert)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return self.tp.all_reduce(y)  # the layer's one collective

