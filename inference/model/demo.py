"""A small deterministic DeepSeek-V3.1-format checkpoint with random weights, for machines without the real one.

Written from a fixed seed in exactly the real on-disk layout: config.json (deepseek_v3, YaRN `rope_scaling`,
FP8 `quantization_config` with 128x128 blocks and `scale_fmt` ue8m0), FP8 e4m3 linear weights with power-of-two
`weight_scale_inv`, bf16 embeddings, norms and router, fp32 `e_score_correction_bias`, a multi-token-prediction
layer, sharded over two safetensors files with an index. No tokenizer.json: the engine falls back to the bundled
DeepSeek-V3.1 vocabulary. Its weights are random, so its output is noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepseek_mcp.inference.resources import default_cache_dir

DEMO_VERSION = "v1"
DEMO_NAME = "deepseek-v3.1-demo (random weights)"
FP8_MAX = 448.0

DEMO_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "_name_or_path": DEMO_NAME,
    "vocab_size": 129280,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 128,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "qk_nope_head_dim": 64,
    "topk_method": "noaux_tc",
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    },
}


def demo_checkpoint_path(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint's directory, written on first use (about 0.3 GB, a few seconds)."""
    target = (cache_dir or default_cache_dir()) / f"demo-{DEMO_VERSION}"
    if (target / "model.safetensors.index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        write_demo_checkpoint(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent writer's identical result may already be there
        except OSError:
            if not (target / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quantize_fp8_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (e4m3 [N, K], power-of-two scale_inv [ceil(N/b), ceil(K/b)]) with w ~= q * scale."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)  # [nb, kb]
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))  # UE8M0: powers of two
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def write_demo_checkpoint(out: Path, seed: int = 20250821) -> None:
    cfg = DEMO_CONFIG
    g = torch.Generator().manual_seed(seed)
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    h, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    rope, vdim = cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    inter, moe_inter, n_exp = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    tensors: list[dict[str, torch.Tensor]] = [{}, {}]  # two shards

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(shard: int, name: str, n: int, k: int) -> None:
        q, s = quantize_fp8_blockwise(randn(n, k, std=k**-0.5))
        tensors[shard][name + ".weight"] = q
        tensors[shard][name + ".weight_scale_inv"] = s

    def norm(shard: int, name: str, dim: int) -> None:
        tensors[shard][name + ".weight"] = (1.0 + randn(dim, std=0.05)).to(torch.bfloat16)

    def block(shard: int, p: str, layer: int) -> None:
        norm(shard, p + "input_layernorm", d)
        norm(shard, p + "post_attention_layernorm", d)
        linear(shard, p + "self_attn.q_a_proj", qr, d)
        norm(shard, p + "self_attn.q_a_layernorm", qr)
        linear(shard, p + "self_attn.q_b_proj", h * (nope + rope), qr)
        linear(shard, p + "self_attn.kv_a_proj_with_mqa", kvr + rope, d)
        norm(shard, p + "self_attn.kv_a_layernorm", kvr)
        linear(shard, p + "self_attn.kv_b_proj", h * (nope + vdim), kvr)
        linear(shard, p + "self_attn.o_proj", d, h * vdim)
        if layer < cfg["first_k_dense_replace"]:
            for proj, (n, k) in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
                linear(shard, f"{p}mlp.{proj}", n, k)
            return
        tensors[shard][p + "mlp.gate.weight"] = randn(n_exp, d, std=d**-0.5).to(torch.bfloat16)
        tensors[shard][p + "mlp.gate.e_score_correction_bias"] = randn(n_exp, std=0.02)
        for e in range(n_exp):
            for proj, (n, k) in (("gate_proj", (moe_inter, d)), ("up_proj", (moe_inter, d)),
                                 ("down_proj", (d, moe_inter))):
                linear(shard, f"{p}mlp.experts.{e}.{proj}", n, k)
        shared = moe_inter * cfg["n_shared_experts"]
        for proj, (n, k) in (("gate_proj", (shared, d)), ("up_proj", (shared, d)), ("down_proj", (d, shared))):
            linear(shard, f"{p}mlp.shared_experts.{proj}", n, k)

    embed = randn(v, d, std=1.0).to(torch.bfloat16)
    head = randn(v, d, std=d**-0.5).to(torch.bfloat16)
    tensors[0]["model.embed_tokens.weight"] = embed
    n_layers = cfg["num_hidden_layers"]
    for layer in range(n_layers):
        block(0 if layer < n_layers // 2 else 1, f"model.layers.{layer}.", layer)
    norm(1, "model.norm", d)
    tensors[1]["lm_head.weight"] = head
    # Multi-token-prediction layer, stored after the main layers as in the real checkpoint.
    mtp = f"model.layers.{n_layers}."
    block(1, mtp, n_layers)
    norm(1, mtp + "enorm", d)
    norm(1, mtp + "hnorm", d)
    linear(1, mtp + "eh_proj", d, 2 * d)
    norm(1, mtp + "shared_head.norm", d)
    tensors[1][mtp + "embed_tokens.weight"] = embed.clone()
    tensors[1][mtp + "shared_head.head.weight"] = head.clone()

    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(tensors):
        fname = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
