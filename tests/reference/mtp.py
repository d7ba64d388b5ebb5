"""The multi-token-prediction layer's equations in float64 (transformers has no MTP): the main model and the MTP
block are transformers' `DeepseekV3ForCausalLM` run in float64, the MTP's own parts written out here.

    h_t      = main model's last hidden state after its final norm, at position t
    x_t      = eh_proj([rmsnorm(embed(token_{t+1}), enorm); rmsnorm(h_t, hnorm)])
    logits_t = head(rmsnorm(block(x_t) + residual, shared_head.norm))      (the distribution of token t + 2)
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def rmsnorm64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def mtp_logits_reference(hf_config, tensors: dict[str, torch.Tensor], ids: list[int]) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """hf_config: the main model's DeepseekV3Config (L layers); tensors: every checkpoint tensor in float (the
    MTP layer as `model.layers.{L}.*`). -> (main logits [S, V], MTP logits [S - 1, V]) in float64: row t of the
    MTP logits predicts token t + 2 from the main state at t and token t + 1."""
    n = hf_config.num_hidden_layers
    eps = hf_config.rms_norm_eps
    mtp = f"model.layers.{n}."
    main = _load(hf_config, {k: v for k, v in tensors.items() if not k.startswith(mtp)})
    block_cfg = copy.deepcopy(hf_config)
    block_cfg.num_hidden_layers, block_cfg.first_k_dense_replace = 1, 0  # the MTP block: one MoE layer
    state = {k.replace(mtp, "model.layers.0."): v for k, v in tensors.items()
             if k.startswith(mtp) and not k.startswith(tuple(mtp + s for s in ("enorm", "hnorm", "eh_proj",
                                                                                 "shared_head", "embed_tokens")))}
    state["model.norm.weight"] = tensors[mtp + "shared_head.norm.weight"]
    state["lm_head.weight"] = tensors["lm_head.weight"]
    state["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]  # unused: inputs_embeds
    block = _load(block_cfg, state)
    with torch.no_grad():
        x = torch.tensor([ids])
        h = main.model(x).last_hidden_state[0]  # [S, D] after the final norm
        main_logits = main.lm_head(h)
        emb = tensors["model.embed_tokens.weight"].double()[torch.tensor(ids[1:])]  # [S-1, D]
        cat = torch.cat((rmsnorm64(emb, tensors[mtp + "enorm.weight"], eps),
                         rmsnorm64(h[:-1], tensors[mtp + "hnorm.weight"], eps)), dim=-1)  # [S-1, 2D]
        xin = cat @ tensors[mtp + "eh_proj.weight"].double().T  # [S-1, D]
        out = block(inputs_embeds=xin[None], position_ids=torch.arange(len(ids) - 1)[None]).logits[0]
    return main_logits, out


def _load(config, state: dict[str, torch.Tensor]):
    """transformers' model in float64 from checkpoint-named tensors, through `from_pretrained` (which maps the
    per-expert names onto its own layout) and refusing anything missing or left over."""
    from transformers import DeepseekV3ForCausalLM

    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(d) / "model.safetensors"))
        model, info = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float64, output_loading_info=True,
                                                            experts_implementation="eager")  # grouped_mm: no fp64
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    return model.eval()
