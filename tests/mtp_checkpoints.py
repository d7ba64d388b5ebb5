"""Tiny checkpoints with a multi-token-prediction layer in the real on-disk names
(`model.layers.{num_hidden_layers}.*`), for tests/test_mtp.py (the layer against its equations) and
tests/test_mtp_engine.py (drafting in the engine)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_checkpoints import FP8_SKIP, tiny_hf_model
from safetensors.torch import load_file, save_file

MAIN_LAYERS = 3


def _bigram(tensors: dict[str, torch.Tensor], context: float) -> None:
    """Make the MTP layer a perfect drafter of a model that is (nearly) a bigram model: the main blocks' attention
    and MLP outputs scaled by `context` (0: each hidden state is its token's embedding, so the next token depends
    on the last one only); the MTP block's outputs zeroed and eh_proj = [I, 0], so the layer's state is
    enorm(embed(token at t + 1)); every final-facing norm weight 1. The layer then predicts token t + 2 from token
    t + 1 as the main model does (normalizing twice is normalizing once): with `context` 0 every greedy draft is
    right, chained ones too; above 0 the model reads its context and some drafts miss."""
    mtp = f"model.layers.{MAIN_LAYERS}."
    for name in list(tensors):
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            continue
        tensors[name] = tensors[name] * (0.0 if name.startswith(mtp) else context)
    d = tensors["model.embed_tokens.weight"].shape[1]
    tensors[mtp + "eh_proj.weight"] = torch.cat((torch.eye(d), torch.zeros(d, d)), dim=1)
    for name in ("model.norm.weight", mtp + "enorm.weight", mtp + "hnorm.weight", mtp + "shared_head.norm.weight"):
        tensors[name] = torch.ones(d)


def mtp_checkpoint(root: Path, fp8: bool, seed: int, bigram: float | None = None
                   ) -> tuple[Path, object, dict[str, torch.Tensor]]:
    """A tiny model with an MTP layer: transformers writes MAIN_LAYERS + 1 layers (the last one is the MTP block,
    a MoE layer), the MTP's own tensors are added, config.json says MAIN_LAYERS and one next-n layer. `bigram`: the
    context scale of `_bigram` (None: random weights, drafts near chance). Returns the checkpoint, the main model's
    transformers config and every tensor as the reference reads it (FP8: the exact dequantization)."""
    from reference.fp8 import weight_dequant_torch

    from deepseek_mcp.inference.model.demo import quantize_fp8_blockwise

    hf_dir = root / "hf"
    hf = tiny_hf_model(hf_dir, seed=seed, hidden=128, num_hidden_layers=MAIN_LAYERS + 1)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    d, mtp = hf.config.hidden_size, f"model.layers.{MAIN_LAYERS}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[mtp + name + ".weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    tensors[mtp + "eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) * (2 * d) ** -0.5
    if bigram is not None:
        _bigram(tensors, bigram)
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()  # as released: copies
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    stored, ref = {}, {}
    for name, t in tensors.items():
        if fp8 and name.endswith(".weight") and t.dim() == 2 and not any(s in name for s in FP8_SKIP):
            q, s = quantize_fp8_blockwise(t)
            stored[name], stored[name + "_scale_inv"] = q, s
            ref[name] = weight_dequant_torch(q, s)
        else:
            stored[name] = ref[name] = t
    out = root / "ckpt"
    out.mkdir()
    save_file(stored, str(out / "model.safetensors"))
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"] = MAIN_LAYERS, 1
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                      "activation_scheme": "dynamic", "scale_fmt": "ue8m0"}
    (out / "config.json").write_text(json.dumps(cfg))
    hf.config.num_hidden_layers = MAIN_LAYERS
    return out, hf.config, ref


def int4_mtp_checkpoint(root: Path, fmt: str, group: int, seed: int, bigram: float | None = None
                        ) -> dict[str, Path]:
    """`mtp_checkpoint` as a 4-bit checkpoint in `fmt` ("q": the MTP layer's Linears quantized like the main
    blocks', zero points on) and as the exact fp32 dequantization of its codes ("deq")."""
    from quant_packers import write_int4_pair

    path, _, _ = mtp_checkpoint(root, False, seed, bigram)
    return write_int4_pair(root, fmt, group, True, load_file(str(path / "model.safetensors")),
                           json.loads((path / "config.json").read_text()),
                           unlisted=("shared_head.head",))  # the layer's copy of the head: never loaded
