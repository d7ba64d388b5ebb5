"""DeepSeek-V3 in the paper's order: embedding, RMSNorm, YaRN rope, MLA, dense MLP, MoE gate, experts, block.

One forward runs a flattened batch of new tokens from several sequences (prefill chunks and decodes mixed)
against a paged latent cache `[num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`.
Module and parameter names follow the Hugging Face checkpoint, so loading is a name lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.engine.batch import AttentionMetadata
from inference.model.config import ModelConfig, RopeConfig, yarn_mscale

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


def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """w [..., N, K] e4m3, scale_inv [..., ceil(N/b), ceil(K/b)] -> [..., N, K] dtype, exact in fp32.

    The torch path's per-matmul dequantization (stacked experts included); few ops, since on CPU the number of
    small ops, not bytes, sets the cost of a decode step.
    """
    *lead, n, k = w.shape
    if n % block == 0 and k % block == 0:
        nb, kb = n // block, k // block
        x = w.view(*lead, nb, block, kb, block).to(torch.float32)
        x.mul_(scale_inv.view(*lead, nb, 1, kb, 1))
        return x.view(*lead, n, k).to(dtype)
    scale = scale_inv.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return (w.to(torch.float32) * scale).to(dtype)  # edge blocks: partial rows/columns


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, rt: Runtime, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = _frozen(torch.empty(dim, dtype=rt.dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary:
    """YaRN rope (or plain rope) over the `qk_rope_head_dim` part, in fp32."""

    def __init__(self, cfg: RopeConfig, dim: int, device: torch.device):
        self.interleave = cfg.interleave
        pos_freqs = cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        inv_freq = 1.0 / pos_freqs  # [dim/2]
        self.attention_factor = 1.0
        if cfg.type == "yarn":
            low, high = _yarn_correction_range(cfg, dim)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
            extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
            inv_freq = inv_freq / cfg.factor * (1 - extrapolation) + inv_freq * extrapolation
            if cfg.attention_factor is not None:
                self.attention_factor = float(cfg.attention_factor)
            elif cfg.mscale and cfg.mscale_all_dim:
                num, den = yarn_mscale(cfg.factor, cfg.mscale), yarn_mscale(cfg.factor, cfg.mscale_all_dim)
                self.attention_factor = num / den
            else:
                self.attention_factor = yarn_mscale(cfg.factor)
        self.inv_freq = inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., R]; cos/sin [T, R/2]."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        c, s = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:  # pairs (x0, x1), (x2, x3), ... each rotated by one frequency
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:  # halves (x0..x_{R/2-1}), (x_{R/2}..)
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return out.to(x.dtype)


def _yarn_correction_range(cfg: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        turns = cfg.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return low, high


def paged_mla_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Torch path of absorbed MLA over the paged cache (new tokens are already written into it).

    q_latent [T, H, C], q_pe [T, H, R], cache [num_blocks, block_size, C + R] -> [T, H, C] (fp32 math).
    New token i of sequence b sits at position seq_len - q_len + i and sees positions 0..itself.
    """
    c = q_latent.shape[-1]
    bs = meta.block_size
    out = torch.empty(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    start = 0
    for b, (seq_len, q_len) in enumerate(zip(meta.seq_lens_list, meta.query_lens_list)):
        blocks = meta.block_tables[b, : -(-seq_len // bs)]
        kv = cache[blocks].reshape(-1, cache.shape[-1])[:seq_len].float()  # [L, C+R]
        q = torch.cat((q_latent[start : start + q_len], q_pe[start : start + q_len]), dim=-1).float()  # [n, H, C+R]
        scores = torch.einsum("nhd,ld->nhl", q, kv) * scale  # [n, H, L]
        if q_len > 1:
            pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            future = torch.arange(seq_len, device=q.device)[None, :] > pos[:, None]  # [n, L]
            scores.masked_fill_(future[:, None, :], float("-inf"))
        out[start : start + q_len] = torch.einsum("nhl,lc->nhc", scores.softmax(-1), kv[:, :c])
        start += q_len
    return out


class MLA(nn.Module):
    """Multi-head latent attention with the up-projections absorbed into the query and the output."""

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t, h, c = x.shape[0], cfg.num_heads, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, h, cfg.qk_head_dim)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)  # [T, H, nope], [T, H, R]
        q_pe = rotary.apply(q_pe, cos, sin)

        kv = self.kv_a_proj_with_mqa(x)  # [T, C + R]
        c_kv = self.kv_a_layernorm(kv[:, :c])  # [T, C]
        k_pe = rotary.apply(kv[:, c:], cos, sin)  # [T, R]
        flat = cache.view(-1, cache.shape[-1])  # [num_blocks * block_size, C + R]
        flat[meta.slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(cache.dtype)

        wkv_b = self.kv_b_proj.dense_weight(x.dtype).view(h, cfg.qk_nope_head_dim + cfg.v_head_dim, c)
        w_uk, w_uv = wkv_b[:, : cfg.qk_nope_head_dim], wkv_b[:, cfg.qk_nope_head_dim :]  # [H, nope, C], [H, v, C]
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)  # [T, H, C]
        if self.rt.backend == "triton":
            from kernels.mla import mla_decode, mla_prefill

            if meta.is_decode:
                o = mla_decode(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, cfg.softmax_scale,
                               max_seq_len=meta.max_seq_len)
            else:
                o = mla_prefill(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                cfg.softmax_scale)
        else:
            o = paged_mla_attention(q_latent, q_pe, cache, meta, cfg.softmax_scale)
        o = torch.einsum("thc,hvc->thv", o.to(x.dtype), w_uv)  # [T, H, v]
        return self.o_proj(o.reshape(t, h * cfg.v_head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.gate_proj = Linear(dim, inter, rt, fp8, device)
        self.up_proj = Linear(dim, inter, rt, fp8, device)
        self.down_proj = Linear(inter, dim, rt, fp8, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(scores_logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores, bias for selection only, group-limited top-k.

    scores_logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k] int64). Unselected groups are masked
    with -inf (as DeepSeek's reference), so a negative biased score in a chosen group still beats them.
    """
    t, e = scores_logits.shape
    scores = scores_logits.sigmoid()
    biased = scores + bias.float()
    if cfg.n_group > 1:
        grouped = biased.view(t, cfg.n_group, e // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
    idx = biased.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, k]
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.weight = _frozen(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=rt.dtype, device=device))
        self.e_score_correction_bias = _frozen(torch.empty(cfg.n_routed_experts, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return route(logits, self.e_score_correction_bias, self.cfg)


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

    def fuse_gate_up_(self) -> None:
        """For the grouped-GEMM kernel: gate and up stacked as one [E, 2I, D] weight (scales: gate's blocks, then
        up's), built once after loading; the separate copies are dropped."""
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
        order = flat.argsort(stable=True)
        token_of = order // k  # [T*k] source token of each sorted row
        counts = torch.bincount(flat, minlength=self.down_proj.shape[0])  # [E]
        xs = x[token_of]  # [T*k, D]
        if self.rt.backend == "triton":  # one launch per projection for all experts, no host sync
            from kernels.moe import moe_grouped_gemm

            offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=x.device)
            offsets[1:] = counts.cumsum(0)
            h = moe_grouped_gemm(xs, offsets, self.gate_up_proj, self.gate_up_proj_scale_inv, "swiglu",
                                 scale_fmt=self.rt.scale_fmt)  # [T*k, I]
            ys = moe_grouped_gemm(h, offsets, self.down_proj, self.down_proj_scale_inv, scale_fmt=self.rt.scale_fmt)
            return self._combine(ys, weights, order, token_of, t)
        active = counts.nonzero().flatten()  # [A]
        sizes = counts[active].tolist()
        w_gate = self._weights("gate_proj", active, x.dtype)  # [A, I, D]
        w_up = self._weights("up_proj", active, x.dtype)  # [A, I, D]
        w_down = self._weights("down_proj", active, x.dtype)  # [A, D, I]
        if all(n == sizes[0] for n in sizes):  # e.g. decode at batch 1: one batched matmul per projection
            seg = xs.view(len(sizes), sizes[0], -1)  # [A, n, D]
            h = F.silu(torch.bmm(seg, w_gate.transpose(1, 2))) * torch.bmm(seg, w_up.transpose(1, 2))
            ys = torch.bmm(h, w_down.transpose(1, 2)).view(t * k, -1)
        else:
            ys = torch.empty_like(xs)
            start = 0
            for j, n in enumerate(sizes):
                seg = xs[start : start + n]
                h = F.silu(F.linear(seg, w_gate[j])) * F.linear(seg, w_up[j])
                ys[start : start + n] = F.linear(h, w_down[j])
                start += n
        return self._combine(ys, weights, order, token_of, t)

    @staticmethod
    def _combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token_of: torch.Tensor,
                 t: int) -> torch.Tensor:
        """Weighted scatter-add of the sorted expert outputs [T*k, D] back to their tokens -> [T, D]."""
        dtype = ys.dtype
        ys = ys.float() * weights.flatten()[order, None]
        out = torch.zeros(t, ys.shape[1], dtype=torch.float32, device=ys.device)
        return out.index_add_(0, token_of, ys).to(dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device):
        super().__init__()
        self.gate = Gate(cfg, rt, device)
        self.experts = Experts(cfg, rt, fp8, device)
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter, rt, fp8, device) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.gate(x)
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

    def forward(self, x, cos, sin, rotary, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rotary, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids/positions [T], kv_cache [L, num_blocks, block_size, C + R] -> logits [N, V] fp32."""
        x = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions)  # [T, R/2]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, self.rotary, meta, kv_cache[i])
        h = self.model.norm(x[meta.logits_indices])  # [N, D]
        return self.lm_head(h).float()

    def prepare_for_kernels_(self) -> None:
        """After loading, lay weights out as the Triton kernels read them (fused expert gate+up)."""
        if self.rt.backend == "triton":
            for module in self.modules():
                if isinstance(module, Experts) and module.gate_proj is not None:
                    module.fuse_gate_up_()

    def dequantize_fp8_(self) -> None:
        """Replace every FP8 weight by its dequantized copy in the activation dtype (frees the FP8 data)."""
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
