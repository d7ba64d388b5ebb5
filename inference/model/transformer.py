"""DeepSeek-V3 in the paper's order: embedding, MLA, the block (RMSNorm, Linear and the dense MLP in layers.py; the
MoE gate and experts in moe.py), the decoder stack, the multi-token-prediction layer and the output head.

Every layer is built for one rank of a tensor-parallel group (`TPContext`, one device by default) and holds only
its slice (parallel.py); the single-device model is the same classes with a world size of 1.

One forward runs a flattened batch of new tokens from several sequences (prefill chunks and decodes mixed)
against a paged latent cache `[num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`.
Module and parameter names follow the Hugging Face checkpoint, so loading is a name lookup.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from deepseek_mcp.inference.model import attention, onednn
from deepseek_mcp.inference.model.attention import AttentionMetadata
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.layers import (
    MLP,
    ColumnParallelLinear,
    Fp8Act,
    Linear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    Runtime,
    VocabParallelEmbedding,
    _frozen,
    fuse_linears,
    plain,
)
from deepseek_mcp.inference.model.layout import dequant_fp8
from deepseek_mcp.inference.model.moe import Experts, Gate, MoE
from deepseek_mcp.inference.model.parallel import ONE_DEVICE, TPContext, check_divisible
from deepseek_mcp.inference.model.rope import Rotary


class MLA(nn.Module):
    """Multi-head latent attention: absorbed form (W_UK into the query, W_UV into the output) for decode,
    naive form (K and V expanded per head) for prefill chunks on the torch path.

    `prepare_()` lays the weights out once after loading: kv_b_proj split into dense W_UK [H, nope, C] and W_UV
    [H, v, C]; q_a_proj and kv_a_proj_with_mqa fused into one GEMM (one activation quantization under FP8).
    """

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext,
                 prefix: str = "self_attn"):
        super().__init__()
        self.cfg, self.rt = cfg, rt
        h, d = cfg.num_heads, cfg.hidden_size  # this rank computes heads [rank * H/N, (rank + 1) * H/N)

        def n(module: str) -> str:  # the checkpoint's module names (which ones are 4-bit)
            return f"{prefix}.{module}"

        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(d, h * cfg.qk_head_dim, rt, fp8, device, tp, n("q_proj"))
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, rt, fp8, device, rt.int4_group(n("q_a_proj")), n("q_a_proj"))
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, rt, device)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, h * cfg.qk_head_dim, rt, fp8, device, tp,
                                                 n("q_b_proj"))
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, rt, fp8, device,
                                         rt.int4_group(n("kv_a_proj_with_mqa")), n("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, rt, device)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), rt,
                                              fp8, device, tp, n("kv_b_proj"))
        self.o_proj = RowParallelLinear(h * cfg.v_head_dim, d, rt, fp8, device, tp, name=n("o_proj"))
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

    def first_projections(self) -> list[Linear]:
        """The projections that read the block's normalized input (the input norm quantizes for them when all
        run the FP8 GEMM)."""
        if self.qkv_a_proj is not None:
            return [self.qkv_a_proj]
        return [self.kv_a_proj_with_mqa, self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj]

    def forward(self, x: torch.Tensor | Fp8Act, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary,
                meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t, dtype, device = plain(x).shape[0], plain(x).dtype, plain(x).device
        c, nope, r = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        heads = self.w_uk.shape[0]
        if self.qkv_a_proj is not None:
            q, kv = self.qkv_a_proj(x).split([cfg.q_lora_rank, c + r], dim=-1)  # [T, q_lora], [T, C + R]
            q = self.q_b_proj(self.q_a_layernorm(q))
        else:
            kv = self.kv_a_proj_with_mqa(x)  # [T, C + R]
            q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, heads, cfg.qk_head_dim).split([nope, r], dim=-1)  # [T, H, nope], [T, H, R]
        from deepseek_mcp.kernels import rope  # norm(c_kv) and rope(k_pe) into the cache slots, rope(q_pe): one kernel

        write = rope.rope_kv_cache if self.rt.kernels == "triton" else rope.rope_kv_cache_torch
        q_pe = write(kv, self.kv_a_layernorm.weight, q_pe, cos, sin, meta.slot_mapping,
                     cache.view(-1, cache.shape[-1]), self.kv_a_layernorm.eps, rotary.interleave)  # [T, H, R]

        if not meta.is_decode and (self.rt.kernels == "torch" or min(meta.query_lens_list) > 1):  # naive form
            naive = attention.prefill_attention_naive if self.rt.kernels == "torch" else attention.prefill_naive_kernel
            o = naive(q_nope, q_pe, cache, meta, self.w_uk, self.w_uv, cfg.softmax_scale)  # [T, H, v]
            return self.o_proj(o.to(dtype).reshape(t, heads * cfg.v_head_dim))
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, C]
        if self.rt.kernels == "triton":
            from deepseek_mcp.kernels.mla import mla_decode, mla_prefill

            if meta.is_decode:
                o = mla_decode(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, cfg.softmax_scale,
                               max_seq_len=meta.max_seq_len)
            else:
                o = mla_prefill(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                cfg.softmax_scale)
        else:
            o = attention.decode_attention(q_latent, q_pe, cache, meta, cfg.softmax_scale)  # [T, H, C]
        out = torch.empty(t, heads, cfg.v_head_dim, dtype=dtype, device=device)  # [T, H, v]
        # W_UV per head, written through a [H, T, v] view so o_proj reads [T, H * v] as is (no reshape copy)
        torch.bmm(o.to(dtype).transpose(0, 1), self.w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return self.o_proj(out.view(t, heads * cfg.v_head_dim))


class Block(nn.Module):
    def __init__(self, layer: int, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext):
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.self_attn = MLA(cfg, rt, fp8, device, tp, f"{prefix}.self_attn")
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(cfg, rt, fp8, device, tp, f"{prefix}.mlp")
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rt, fp8, device, tp, prefix=f"{prefix}.mlp")
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

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, rt, device, tp)
        self.layers = nn.ModuleList(Block(i, cfg, rt, fp8, device, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt, device)


class SharedHead(nn.Module):
    """`shared_head.norm`; the head itself is the main model's `lm_head`."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, device: torch.device):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt, device)


class MTPLayer(Block):
    """Multi-token prediction (V3 paper, section 2.2, depth 1): from the main model's hidden state at position t
    and the token at t + 1, the distribution of the token at t + 2.

        h'_t = eh_proj([enorm(embed(token_{t+1})); hnorm(h_t)])   embedding half first, as vLLM's deepseek_mtp and
        h''_t = block(h'_t) + its residual                          SGLang's deepseek_nextn load the released weights
        logits_{t+2} = head(shared_head.norm(h''_t))

    h_t is the main model's state after its final norm (what its head reads; vLLM and SGLang feed the same). The
    block is the checkpoint's layer `num_hidden_layers` (same classes, fusions and split as the main model's, its
    own latent cache); `enorm`, `hnorm`, `eh_proj` (replicated under tensor parallelism) and `shared_head.norm`
    beside it. The embedding and head are the main model's (shared, as the paper says; the layer's copies are not
    loaded, as SGLang). Applied to its own output state, it drafts further. vLLM also zeroes the embedding at
    position 0; SGLang does not, nor does this: a draft's quality, never an output, depends on it."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool, device: torch.device, tp: TPContext):
        super().__init__(cfg.num_layers, cfg, rt, fp8, device, tp)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, rt, device)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, rt, device)
        eh = f"model.layers.{cfg.num_layers}.eh_proj"
        self.eh_proj = Linear(2 * d, d, rt, fp8, device, rt.int4_group(eh), eh)
        self.shared_head = SharedHead(cfg, rt, device)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rotary: Rotary, meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        """embeds [T, D] of the tokens at t + 1, hidden [T, D] the main model's normed state at t, rows at
        positions t (cos/sin, meta) -> the layer's hidden state [T, D] before `shared_head.norm`."""
        x = torch.cat((plain(self.enorm(embeds)), plain(self.hnorm(hidden))), dim=-1)  # [T, 2D]
        out, residual = super().forward(self.eh_proj(x), None, cos, sin, rotary, meta, cache)
        return out + residual


class Transformer(nn.Module):
    """This rank's part of the model (the whole model on one device), parameters uninitialized (vocabulary
    padding zero); sizes that do not split over `tp` are refused before anything is allocated."""

    def __init__(self, cfg: ModelConfig, rt: Runtime, fp8: bool = False, device: torch.device | str = "cpu",
                 tp: TPContext = ONE_DEVICE, mtp: bool = False):
        super().__init__()
        check_divisible(cfg, tp.world_size)
        if mtp and cfg.num_nextn_predict_layers < 1:
            raise ValueError("the multi-token-prediction layer was asked for, but config.json has "
                             "num_nextn_predict_layers = 0: this checkpoint has none")
        device = torch.device(device)
        if cfg.int4 is not None:  # a 4-bit checkpoint: its scheme says which Linears are 4-bit
            rt, fp8 = replace(rt, int4=cfg.int4), False
        self.cfg, self.rt, self.tp = cfg, rt, tp
        self.model = DecoderStack(cfg, rt, fp8, device, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, rt, device, tp)
        self.mtp: MTPLayer | None = None  # the checkpoint's layer num_hidden_layers, when asked for
        if mtp:
            self.mtp = MTPLayer(cfg, rt, fp8, device, tp)
        self.rotary = Rotary(cfg.rope, cfg.qk_rope_head_dim, device)
        self.prepared = False  # weights laid out for the step (prepare_for_kernels_)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor, return_hidden: bool = False, all_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids/positions [T], kv_cache [L (+ 1 with the MTP layer), num_blocks, block_size, C + R] ->
        logits [N, V] fp32 (and, for the MTP layer, the normed hidden states: [N, D], the rows the head read,
        with `return_hidden`; [T, D], every new token's, with `all_hidden`)."""
        if not self.prepared:
            raise RuntimeError("call prepare_for_kernels_() after loading the weights, before the first forward")
        x = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions)  # [T, R/2]
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, self.rotary, meta, kv_cache[i])
        rows = meta.logits_indices
        if all_hidden:
            states, _ = self.model.norm.add_forward(x, residual)  # [T, D]
            return self.lm_head(states[rows]).float(), states
        h, _ = self.model.norm.add_forward(x[rows], residual[rows])  # [N, D]
        logits = self.lm_head(h).float()
        return (logits, h) if return_hidden else logits

    @torch.inference_mode()
    def draft(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
              kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer (MTPLayer): input_ids [T] the tokens at t + 1, positions [T] = t, hidden [T, D] the normed
        states at t (from `forward(..., return_hidden=True)` or a previous draft), the MTP latent cache in
        kv_cache[L] -> (logits [N, V] fp32 of the tokens at t + 2, its normed hidden states [N, D])."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its multi-token-prediction layer (mtp=True)")
        x = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions)
        h = self.mtp(x, hidden, cos, sin, self.rotary, meta, kv_cache[self.cfg.num_layers])  # [T, D]
        h = self.mtp.shared_head.norm(h[meta.logits_indices])  # [N, D]
        return self.lm_head(h).float(), h

    def prepare_for_kernels_(self, cpu_prepack: bool = True) -> None:
        """After loading (and after any dequantization or tensor-parallel slicing), lay the weights out once as
        the step reads them: W_UK / W_UV split, q_a + kv_a and MLP gate + up fused, the router weight in fp32;
        on the Triton path the routed experts' gate + up stacked with the shared expert as one more, and every
        norm whose readers all run the FP8 GEMM set to write their quantized input too; on the CPU torch path
        (`cpu_prepack`) the dense bf16 Linear weights reordered into oneDNN's layout (inference/model/onednn.py;
        not a head tied to the embedding, which would need a second copy). Idempotent."""
        if self.prepared:
            return
        for module in self.modules():
            if isinstance(module, MLA):
                module.prepare_()
            elif isinstance(module, MLP):
                module.fuse_gate_up_()
            elif isinstance(module, Gate):
                module.prepare_()
            elif isinstance(module, Experts) and self.rt.kernels == "triton" and module.gate_proj is not None:
                module.fuse_gate_up_()
        for module in self.modules():
            if isinstance(module, MoE) and self.rt.kernels == "triton":
                module.fuse_shared_expert_()
        if self.rt.kernels == "triton":  # norms whose readers all run the FP8 GEMM also write the FP8 copy
            for block in [*self.model.layers, *([self.mtp] if self.mtp is not None else [])]:
                attn = block.self_attn
                block.input_layernorm.quantize = all(p.takes_fp8 for p in attn.first_projections())
                if self.cfg.q_lora_rank is not None:
                    attn.q_a_layernorm.quantize = attn.q_b_proj.takes_fp8
                block.post_attention_layernorm.quantize = getattr(block.mlp, "takes_fp8", False)
        if cpu_prepack and self.rt.kernels == "torch" and onednn.probe(self.rt.dtype):
            tied = self.lm_head.weight is self.model.embed_tokens.weight
            for module in self.modules():
                if isinstance(module, Linear) and not (tied and module is self.lm_head):
                    module.pack_cpu_(dtype_ok=True)
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
