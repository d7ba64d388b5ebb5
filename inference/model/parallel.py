"""Tensor and expert parallelism as a pass over the plain model (DeepSeek's reference split of V3).

`shard_model(cfg, rt, fp8, device, tp)` builds the `Transformer` on the meta device and swaps its modules for
their per-rank versions on `device`, so no rank ever allocates the whole model:
- attention heads split over ranks: `q_proj`/`q_b_proj` and `kv_b_proj` column-parallel by head, `o_proj`
  row-parallel + all-reduce; `q_a_proj`, `kv_a_proj_with_mqa` and the norms replicated, so every rank holds the
  full latent cache (replicated, as in the reference);
- dense MLPs: gate/up column-parallel, down row-parallel + all-reduce;
- MoE: every rank routes all tokens, runs its own index range of routed experts and its column/row slice of the
  shared experts, and one all-reduce sums both partial outputs;
- embedding vocabulary-parallel (vocabulary padded to a multiple of N; masked lookup + all-reduce), `lm_head`
  column-parallel with the logits gathered on rank 0.
Every parallel parameter carries a `Shard` saying which slice of the checkpoint tensor it holds; the loader
(`parallel_load.py`) reads exactly that slice. The process group is passed in (`TPContext`), never global.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.layers import MLP, Linear, Runtime
from deepseek_mcp.inference.model.moe import Experts, Gate, MoE
from deepseek_mcp.inference.model.rope import Rotary
from deepseek_mcp.inference.model.transformer import MLA, Transformer


class ParallelConfigError(ValueError):
    """A model whose sizes cannot be split over the requested number of ranks; the message names them."""


@dataclass(frozen=True)
class TPContext:
    """This rank's place in the tensor-parallel group whose collectives the forward runs."""

    rank: int
    world_size: int
    group: Any = None  # torch.distributed ProcessGroup (NCCL on CUDA, gloo on CPU); None = the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x


@dataclass(frozen=True)
class Shard:
    """The slice [start, start + size) along `dim` of the checkpoint tensor that a parameter holds. Rows past
    `size` (vocabulary padding) stay zero. `dequant_block` > 0: an FP8 slice that cuts a scale block, held
    dequantized (exactly, in fp32 then the activation dtype) with its scales sliced from that block."""

    dim: int
    start: int
    size: int
    dequant_block: int = 0


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    """Refuse, before anything is loaded, sizes that do not split (the vocabulary is padded instead)."""
    sizes = {"num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
    if cfg.n_routed_experts:
        sizes["n_routed_experts"] = cfg.n_routed_experts
        sizes["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    bad = [f"{k} = {v}" for k, v in sizes.items() if v % world_size]
    if cfg.first_k_dense_replace == 0 and cfg.n_routed_experts:
        bad = [b for b in bad if not b.startswith("intermediate_size")]  # no dense layer reads it
    if bad:
        raise ParallelConfigError(f"tensor-parallel size {world_size} does not divide {', '.join(bad)}; choose a "
                                  "size that divides them all")


def padded_vocab(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def _fp8_cut(fp8: bool, shard: Shard, full: int, block: int) -> bool:
    """Whether an FP8 split along a dimension of length `full` cuts a 128x128 scale block."""
    end = shard.start + shard.size
    return fp8 and (shard.start % block != 0 or (end % block != 0 and end != full))


def _mark(linear: Linear, shard: Shard, cut: bool) -> None:
    """Tag the weight (and the FP8 scale blocks of an aligned split) with the checkpoint slice they hold."""
    b = linear.rt.fp8_block
    linear.weight.shard = replace(shard, dequant_block=b if cut else 0)
    if linear.weight_scale_inv is not None:
        linear.weight_scale_inv.shard = Shard(shard.dim, shard.start // b, -(-shard.size // b))


class ColumnParallelLinear(Linear):
    """Holds output rows [rank * n, (rank + 1) * n) of the full [out, in] weight; output [.., n], no collective."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device,
                 tp: TPContext):
        n = out_features // tp.world_size
        shard = Shard(0, tp.rank * n, n)
        cut = _fp8_cut(fp8, shard, out_features, rt.fp8_block)
        super().__init__(in_features, n, rt, fp8 and not cut, device)
        _mark(self, shard, cut)


class RowParallelLinear(Linear):
    """Holds input columns [rank * n, (rank + 1) * n) of the full [out, in] weight; the partial outputs are
    all-reduced unless `reduce` is False (the MoE sums its shared experts with the routed ones first)."""

    def __init__(self, in_features: int, out_features: int, rt: Runtime, fp8: bool, device: torch.device,
                 tp: TPContext, reduce: bool = True):
        n = in_features // tp.world_size
        shard = Shard(1, tp.rank * n, n)
        cut = _fp8_cut(fp8, shard, in_features, rt.fp8_block)
        super().__init__(n, out_features, rt, fp8 and not cut, device)
        _mark(self, shard, cut)
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [T, out] partial sum over this rank's columns
        return self.tp.all_reduce(y) if self.reduce else y


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of the vocabulary padded to N * n; ids elsewhere look up zeros, and the
    all-reduce fills every row from the rank that holds it."""

    def __init__(self, vocab_size: int, dim: int, rt: Runtime, device: torch.device, tp: TPContext):
        super().__init__()
        n = padded_vocab(vocab_size, tp.world_size) // tp.world_size
        self.start, self.rows, self.tp = tp.rank * n, n, tp
        self.weight = nn.Parameter(torch.zeros(n, dim, dtype=rt.dtype, device=device), requires_grad=False)
        self.weight.shard = Shard(0, self.start, max(0, min(n, vocab_size - self.start)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start  # [T]
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, D]
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))


class ParallelLMHead(ColumnParallelLinear):
    """Column-parallel over the padded vocabulary; rank 0 gathers the full logits [N, V], other ranks return
    their own columns (which nobody reads)."""

    def __init__(self, dim: int, vocab_size: int, rt: Runtime, device: torch.device, tp: TPContext):
        super().__init__(dim, padded_vocab(vocab_size, tp.world_size), rt, False, device, tp)
        shard = self.weight.shard
        self.weight.shard = replace(shard, size=max(0, min(shard.size, vocab_size - shard.start)))
        nn.init.zeros_(self.weight)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x).contiguous()  # [N, V_pad / world]
        if self.tp.world_size == 1:
            return local[:, : self.vocab_size]
        parts = [torch.empty_like(local) for _ in range(self.tp.world_size)] if self.tp.rank == 0 else None
        dst = 0 if self.tp.group is None else dist.get_global_rank(self.tp.group, 0)
        dist.gather(local, parts, dst=dst, group=self.tp.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size] if parts is not None else local


class LocalExperts(Experts):
    """The routed experts [start, start + n) of this rank, stacked as in `Experts`."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext):
        n = cfg.n_routed_experts // tp.world_size
        super().__init__(replace(cfg, n_routed_experts=n), rt, fp8, device)
        self.start, self.num_local = tp.rank * n, n

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/idx [T, k] over all experts -> [T, D]: the weighted sum of this rank's experts only.
        Triton: `Experts.forward` on the local ids as they are; other ranks' experts fall outside [0, n) and
        moe_align sorts them past offsets[n], where the GEMMs and the combine skip them (no host sync, shapes
        fixed by T and k; a token with no expert here gets 0). Torch: the pairs routed here, found on the host,
        run as a batch of single-expert rows."""
        local = idx - self.start  # [T, k]
        if self.rt.kernels == "triton":
            return super().forward(x, weights, local)
        pairs = ((local >= 0) & (local < self.num_local)).flatten().nonzero().flatten()  # [P]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if pairs.numel() == 0:
            return out.to(x.dtype)
        k = idx.shape[1]
        token = pairs // k  # [P]
        ys = super().forward(x[token], weights.flatten()[pairs, None], local.flatten()[pairs, None])  # [P, D]
        return out.index_add_(0, token, ys.float()).to(x.dtype)


class ParallelMoE(nn.Module):
    def __init__(self, moe: MoE, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext):
        super().__init__()
        self.gate: Gate = moe.gate  # replicated: every rank routes every token
        self.experts = LocalExperts(cfg, rt, fp8, device, tp)
        self.shared_experts = None
        if moe.shared_experts is not None:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = _parallel_mlp(cfg.hidden_size, inter, rt, fp8, device, tp, reduce=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x)  # [T, k] each
        y = self.experts(x, weights, idx)  # [T, D] partial: this rank's experts
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)  # [T, D] partial: this rank's columns of the shared experts
        return self.tp.all_reduce(y)  # the one collective of the layer


def _parallel_mlp(dim: int, inter: int, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext,
                  reduce: bool = True) -> MLP:
    mlp = MLP(dim, inter, rt, fp8, torch.device("meta"))
    mlp.gate_proj = ColumnParallelLinear(dim, inter, rt, fp8, device, tp)
    mlp.up_proj = ColumnParallelLinear(dim, inter, rt, fp8, device, tp)
    mlp.down_proj = RowParallelLinear(inter, dim, rt, fp8, device, tp, reduce=reduce)
    return mlp


def _shard_attention(attn: MLA, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device,
                     tp: TPContext) -> None:
    h, d = cfg.num_heads, cfg.hidden_size
    attn.cfg = replace(cfg, num_heads=h // tp.world_size)  # the forward reads its head count from here
    if cfg.q_lora_rank is None:
        attn.q_proj = ColumnParallelLinear(d, h * cfg.qk_head_dim, rt, fp8, device, tp)
    else:
        attn.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, h * cfg.qk_head_dim, rt, fp8, device, tp)
    attn.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), rt, fp8,
                                          device, tp)
    attn.o_proj = RowParallelLinear(h * cfg.v_head_dim, d, rt, fp8, device, tp)


def shard_model(cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device | str, tp: TPContext) -> Transformer:
    """This rank's part of the model on `device`, parameters uninitialized (vocabulary padding zero)."""
    check_divisible(cfg, tp.world_size)
    device = torch.device(device)
    model = Transformer(cfg, rt, fp8=fp8, device="meta")
    for block in model.model.layers:
        _shard_attention(block.self_attn, cfg, rt, fp8, device, tp)
        if isinstance(block.mlp, MoE):
            block.mlp = ParallelMoE(block.mlp, cfg, rt, fp8, device, tp)
        else:
            block.mlp = _parallel_mlp(cfg.hidden_size, cfg.intermediate_size, rt, fp8, device, tp)
    model.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, rt, device, tp)
    model.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, rt, device, tp)
    for module in model.modules():  # what stayed on meta is replicated: allocate it here
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(p, device=device), requires_grad=False))
    model.rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, device)
    model.tp = tp
    return model
