"""Tiny random DeepseekV3ForCausalLM checkpoints written by transformers' `save_pretrained` (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_hf_model(path: Path, *, q_lora_rank: int | None = 48, yarn: bool = True, n_group: int = 2,
                  topk_group: int = 1, hidden: int = 64, seed: int = 0, legacy_rope: bool = False, top_k: int = 2,
                  vocab_size: int = 256, moe_intermediate_size: int = 32, qk_nope_head_dim: int = 16,
                  qk_rope_head_dim: int = 8, v_head_dim: int = 16, intermediate_size: int = 96,
                  num_hidden_layers: int = 3):
    """Save a tiny random model to `path` and return it (fp32, eval mode)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}
    cfg = DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim, qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim,
        rope_parameters=rope, max_position_embeddings=256,
        num_nextn_predict_layers=0, initializer_range=0.1, routed_scaling_factor=2.5,
    )
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initializes norms to ones: perturb so a missing norm cannot pass
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(path)
    if legacy_rope:  # older config.json files: `rope_scaling` + `rope_theta` instead of `rope_parameters`
        raw = json.loads((path / "config.json").read_text())
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        raw["rope_scaling"] = params if params["type"] != "default" else None
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return model


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # [T, V]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


FP8_SKIP = ("norm", "embed_tokens", "lm_head", "mlp.gate.")


def fp8_checkpoint_pair(root: Path, hidden: int = 192, seed: int = 7, **model_kw) -> dict[str, Path]:
    """The same tiny model as an FP8 checkpoint (UE8M0 block scales) and as its exact fp32 dequantization.

    hidden 192 = one full 128 block plus a 64-wide edge block."""
    from reference.fp8 import weight_dequant_torch
    from safetensors.torch import load_file, save_file

    from deepseek_mcp.inference.model.demo import quantize_fp8_blockwise

    base = root / "hf"
    base.mkdir()
    tiny_hf_model(base, hidden=hidden, seed=seed, **model_kw)
    tensors = load_file(str(base / "model.safetensors"))
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dim() == 2 and not any(s in name for s in FP8_SKIP):
            q, s = quantize_fp8_blockwise(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = weight_dequant_torch(q, s)
        else:
            fp8[name] = deq[name] = t
    cfg = json.loads((base / "config.json").read_text())
    dirs = {}
    for kind, ts in (("fp8", fp8), ("deq", deq)):
        d = root / kind
        d.mkdir()
        save_file(ts, str(d / "model.safetensors"))
        c = dict(cfg)
        if kind == "fp8":
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                        "activation_scheme": "dynamic", "scale_fmt": "ue8m0"}
        (d / "config.json").write_text(json.dumps(c))
        dirs[kind] = d
    return dirs
