"""DeepSeek-V3 in the paper's order: embedding, RMSNorm, YaRN rope, MLA, dense MLP, MoE gate, experts, block.

One forward runs a flattened batch of new tokens from several sequences (prefill chunks and decodes mixed)
against a paged latent cache `[num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`.
Module and parameter names follow the Hugging Face checkpoint, so loading is a name lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.engine.batch import AttentionMetadata
from inference.model import attention
from inference.model.config import ModelConfig
from inference.model.layout import dequant_fp8, stack_shared_expert
from inference.model.rope import Rotary

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Runtime:
    """How the model computes: activation dtype and which kernels run (set once at construction)."""

    dtype: torch.dtype = torch.bfloat16
    backend: str = "torch"  # "torch" (twins) or "triton"
    scale_fmt: str | None = None  # activation scales for FP8 GEMM ("ue8m0" on V3.1)
    fp8_block: int = 128


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

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return dequant_fp8(self.weight, self.weight_scale_inv, self.rt.fp8_block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is not None and self.rt.backend == "triton":
            from kernels.fp8 import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale_inv, self.rt.scale_fmt).to(x.dtype)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> weight * norm(x), normalized in fp32 and cast back before the weight (as the reference)."""
        if self.rt.backend == "triton":
            from kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None: (norm(x), x). One kernel on the Triton path."""
        if residual is None:
            return self(x), x
        if self.rt.backend == "triton":
            from kernels.norm import rmsnorm_residual

            return rmsnorm_residual(x, residual, self.weight, self.eps)
        residual = x + residual
        return self(residual), residual


class MLA(nn.Module):
    """Multi-head latent attention: absorbed form (W_UK into the query, W_UV into the output) for decode,
    naive form (K and V expanded per head) for prefill chunks on the torch path.

    `prepare_()` lays the weights out once after loading: kv_b_proj split into dense W_UK [H, nope, C] and W_UV
    [H, v, C]; q_a_proj and kv_a_proj_with_mqa fused into one GEMM (one activation quantization under FP8).
    """

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.cfg, self.rt = cfg, rt
        h, d = cfg.num_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, h * cfg.qk_head_dim, rt, fp8, device)
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, rt, fp8, device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, rt, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, rt, fp8, device)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, rt, fp8, device)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, rt, device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), rt, fp8, device)
        self.o_proj = Linear(h * cfg.v_head_dim, d, rt, fp8, device)
        self.qkv_a_proj: Linear | None = None  # set by prepare_()
        self.w_uk: nn.Parameter | None = None
        self.w_uv: nn.Parameter | None = None

    def prepare_(self) -> None:
        """Split kv_b_proj into W_UK / W_UV (activation dtype; the heads are read from its shape, so a
        head-parallel slice works) and fuse q_a_proj + kv_a_proj_with_mqa when their FP8 blocks allow."""
        cfg = self.cfg
        nope = cfg.qk_nope_head_dim
        wkv_b = self.kv_b_proj.dense_weight(self.rt.dtype)  # [H * (nope + v), C]
        wkv_b = wkv_b.view(-1, nope + cfg.v_head_dim, wkv_b.shape[-1])  # [H, nope + v, C]
        self.w_uk = _frozen(wkv_b[:, :nope].contiguous())  # [H, nope, C]
        self.w_uv = _frozen(wkv_b[:, nope:].contiguous())  # [H, v, C]
        self.kv_b_proj = None
        if cfg.q_lora_rank is not None:
            fused = fuse_linears([self.q_a_proj, self.kv_a_proj_with_mqa])
            if fused is not None:
                self.qkv_a_proj, self.q_a_proj, self.kv_a_proj_with_mqa = fused, None, None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t, c, nope, r = x.shape[0], cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        heads = self.w_uk.shape[0]
        if self.qkv_a_proj is not None:
            q, kv = self.qkv_a_proj(x).split([cfg.q_lora_rank, c + r], dim=-1)  # [T, q_lora], [T, C + R]
            q = self.q_b_proj(self.q_a_layernorm(q))
        else:
            kv = self.kv_a_proj_with_mqa(x)  # [T, C + R]
            q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, heads, cfg.qk_head_dim).split([nope, r], dim=-1)  # [T, H, nope], [T, H, R]
        from kernels import rope  # norm(c_kv) and rope(k_pe) into the cache slots, rope(q_pe): one kernel

        write = rope.rope_kv_cache if self.rt.backend == "triton" else rope.rope_kv_cache_torch
        q_pe = write(kv, self.kv_a_layernorm.weight, q_pe, cos, sin, meta.slot_mapping,
                     cache.view(-1, cache.shape[-1]), self.kv_a_layernorm.eps, rotary.interleave)  # [T, H, R]

        if not meta.is_decode and (self.rt.backend == "torch" or min(meta.query_lens_list) > 1):  # naive form
            naive = attention.prefill_attention_naive if self.rt.backend == "torch" else attention.prefill_naive_kernel
            o = naive(q_nope, q_pe, cache, meta, self.w_uk, self.w_uv, cfg.softmax_scale)  # [T, H, v]
            return self.o_proj(o.to(x.dtype).reshape(t, heads * cfg.v_head_dim))
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, C]
        if self.rt.backend == "triton":
            from kernels.mla import mla_decode, mla_prefill

            if meta.is_decode:
                o = mla_decode(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, cfg.softmax_scale,
                               max_seq_len=meta.max_seq_len)
            else:
                o = mla_prefill(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                cfg.softmax_scale)
        else:
            o = attention.decode_attention(q_latent, q_pe, cache, meta, cfg.softmax_scale)  # [T, H, C]
        o = torch.bmm(o.to(x.dtype).transpose(0, 1), self.w_uv.transpose(1, 2))  # [H, T, v]
        return self.o_proj(o.transpose(0, 1).reshape(t, heads * cfg.v_head_dim))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def route(scores_logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig, backend: str = "torch",
          shared_expert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (kernels/router.py): sigmoid scores, bias for selection only, group-limited top-k.

    scores_logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k] int64). Unselected groups are masked
    with -inf (as DeepSeek's reference), so a negative biased score in a chosen group still beats them.
    """
    from kernels import router

    fn = router.moe_route if backend == "triton" else router.moe_route_torch
    return fn(scores_logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
              cfg.routed_scaling_factor, shared_expert=shared_expert)


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
        logits = F.linear(x.float(), self.weight.float())  # [T, E] (.float() is free once prepared)
        return route(logits, self.e_score_correction_bias, self.cfg, self.rt.backend, self.shared_expert)


class Experts(nn.Module):
    """The routed experts' weights stacked per projection: [E, I, D] (gate, up) and [E, D, I] (down)."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.rt = rt
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        wdtype = FP8_DTYPE if fp8 else rt.dtype
        b = rt.fp8_block
        for name, (n, k) in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
            setattr(self, name, _frozen(torch.empty(e, n, k, dtype=wdtype, device=device)))
            scale = torch.empty(e, -(-n // b), -(-k // b), dtype=torch.float32, device=device) if fp8 else None
            setattr(self, name + "_scale_inv", _frozen(scale) if fp8 else None)

    def _weights(self, name: str, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weights of the given experts, dequantized together: [A, N, K]."""
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

    def set_bounds_(self) -> None:
        """Expert ids 0..E (E counting a stacked shared expert), searched once per step for the row offsets."""
        self.register_buffer("bounds", torch.arange(self.down_proj.shape[0] + 1, device=self.down_proj.device),
                             persistent=False)

    def fuse_gate_up_(self) -> None:
        """For the grouped GEMM: gate and up as one [E, 2I, D] weight (scales: gate's blocks, then up's)."""
        self.gate_up_proj = _frozen(torch.cat((self.gate_proj, self.up_proj), dim=1))
        if self.gate_proj_scale_inv is not None:
            self.gate_up_proj_scale_inv = _frozen(torch.cat((self.gate_proj_scale_inv, self.up_proj_scale_inv), 1))
        else:
            self.gate_up_proj_scale_inv = None
        self.gate_proj = self.up_proj = self.gate_proj_scale_inv = self.up_proj_scale_inv = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/idx [T, k] -> [T, D]: rows sorted by expert; only experts with rows do work."""
        t, k = idx.shape
        flat = idx.flatten()  # [T*k]
        if self.rt.backend == "triton":  # 4 ops + 2 grouped GEMMs + the combine, and nothing reads the device
            from kernels.moe import moe_grouped_gemm
            from kernels.router import moe_combine

            experts, order = flat.sort(stable=True)  # [T*k] each: rows sorted by expert
            xs = x[order // k]  # [T*k, D]
            offsets = torch.searchsorted(experts, self.bounds, out_int32=True)  # [E + 1] first row of each expert
            h = moe_grouped_gemm(xs, offsets, self.gate_up_proj, self.gate_up_proj_scale_inv, "swiglu",
                                 scale_fmt=self.rt.scale_fmt)  # [T*k, I]
            ys = moe_grouped_gemm(h, offsets, self.down_proj, self.down_proj_scale_inv, scale_fmt=self.rt.scale_fmt)
            return moe_combine(ys, weights, order)
        n_experts = self.down_proj.shape[0]
        if self.gate_proj_scale_inv is None and t * k >= n_experts:  # most experts have rows: all at once
            return self._all_experts(x, weights, idx)
        order = flat.argsort(stable=True)
        xs = x[order // k]  # [T*k, D]
        counts = torch.bincount(flat, minlength=n_experts)  # [E]
        if self.gate_proj_scale_inv is None:  # dense: views of the stacked weights, nothing copied per step
            used = [(e, n) for e, n in enumerate(counts.tolist()) if n]  # (expert, rows)
            w_gate, w_up, w_down = self.gate_proj, self.up_proj, self.down_proj
        else:  # FP8 on the torch path: the active experts dequantized together
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
        from kernels.router import moe_combine_torch

        return moe_combine_torch(ys, weights, order)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.gate = Gate(cfg, rt, device)
        self.experts = Experts(cfg, rt, fp8, device)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, rt, fp8, device) if cfg.n_shared_experts else None

    def fuse_shared_expert_(self) -> None:
        """Triton path: the shared expert becomes routed expert E, taken by every token with weight 1, so the
        grouped GEMMs and the combine do its work (7 launches fewer per layer). Only where it has the routed
        experts' shape (n_shared_experts = 1, as V3) and its gate + up are fused."""
        shared, ex = self.shared_experts, self.experts
        if shared is None or shared.gate_up_proj is None or ex.gate_up_proj is None:
            return
        if shared.gate_up_proj.weight.shape != ex.gate_up_proj.shape[1:]:
            return
        ex.gate_up_proj, ex.gate_up_proj_scale_inv = stack_shared_expert(
            ex.gate_up_proj, ex.gate_up_proj_scale_inv, shared.gate_up_proj)
        ex.down_proj, ex.down_proj_scale_inv = stack_shared_expert(ex.down_proj, ex.down_proj_scale_inv,
                                                                   shared.down_proj)
        self.shared_experts, self.gate.shared_expert = None, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x)  # [T, k] each (k + 1 with the shared expert stacked last)
        y = self.experts(x, weights, idx)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class Block(nn.Module):
    def __init__(self, layer: int, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.self_attn = MLA(cfg, rt, fp8, device)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(cfg, rt, fp8, device)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rt, fp8, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                rotary: Rotary, meta: AttentionMetadata, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) [T, D] -> (block output, residual stream before it): their sum is the hidden state."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, rotary, meta, cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderStack(nn.Module):
    """`model.*` in the checkpoint: embedding, blocks, final norm."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=rt.dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(i, cfg, rt, fp8, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt, device)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool = False, device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.cfg, self.rt = cfg, rt
        self.model = DecoderStack(cfg, rt, fp8, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, rt, False, device)
        self.rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, device)
        self.prepared = False  # weights laid out for the step (prepare_for_kernels_)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids/positions [T], kv_cache [L, num_blocks, block_size, C + R] -> logits [N, V] fp32."""
        if not self.prepared:
            raise RuntimeError("call prepare_for_kernels_() after loading the weights, before the first forward")
        x = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions)  # [T, R/2]
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, self.rotary, meta, kv_cache[i])
        rows = meta.logits_indices
        h, _ = self.model.norm.add_forward(x[rows], residual[rows])  # [N, D]
        return self.lm_head(h).float()

    def prepare_for_kernels_(self) -> None:
        """After loading (and after any dequantization or tensor-parallel slicing), lay the weights out once as
        the step reads them: W_UK / W_UV split, q_a + kv_a and MLP gate + up fused, the router weight in fp32,
        and for the Triton path the routed experts' gate + up stacked with the shared expert as one more. Idempotent."""
        if self.prepared:
            return
        for module in self.modules():
            if isinstance(module, MLA):
                module.prepare_()
            elif isinstance(module, MLP):
                module.fuse_gate_up_()
            elif isinstance(module, Gate):
                module.prepare_()
            elif isinstance(module, Experts) and self.rt.backend == "triton" and module.gate_proj is not None:
                module.fuse_gate_up_()
        for module in self.modules():
            if isinstance(module, MoE) and self.rt.backend == "triton":
                module.fuse_shared_expert_()  # before its experts' bounds (modules() visits parents first)
            elif isinstance(module, Experts) and self.rt.backend == "triton":
                module.set_bounds_()  # also a tensor-parallel rank's LocalExperts
        self.prepared = True

    def dequantize_fp8_(self) -> None:
        """Every FP8 weight replaced by its dequantized copy in the activation dtype; before prepare_for_kernels_."""
        if self.prepared:
            raise RuntimeError("dequantize_fp8_ must run before prepare_for_kernels_")
        for module in self.modules():
            if isinstance(module, Linear) and module.weight_scale_inv is not None:
                module.weight = _frozen(module.dense_weight(self.rt.dtype))
                module.weight_scale_inv = None
            elif isinstance(module, Experts):
                for name in ("gate_proj", "up_proj", "down_proj"):  # before prepare_for_kernels_ fuses them
                    scale = getattr(module, name + "_scale_inv")
                    if scale is None:
                        continue
                    dense = dequant_fp8(getattr(module, name), scale, self.rt.fp8_block, self.rt.dtype)
                    setattr(module, name, _frozen(dense))
                    setattr(module, name + "_scale_inv", None)
