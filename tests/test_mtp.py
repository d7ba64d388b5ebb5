"""The multi-token-prediction layer (`MTPLayer`, `Transformer.draft`) against its equations in float64
(tests/reference/mtp.py: transformers' DeepseekV3 blocks in float64 plus the MTP's own parts), on a tiny checkpoint
written in the real on-disk names (the MTP layer as `model.layers.{num_hidden_layers}.*`), plain and FP8; the
demo checkpoint's MTP layer loads; a missing MTP tensor is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mtp_checkpoints import MAIN_LAYERS, mtp_checkpoint
from reference.mtp import mtp_logits_reference
from safetensors.torch import load_file, save_file

from deepseek_mcp.inference.engine.batch import ScheduledSeq, build_batch
from deepseek_mcp.inference.model.checkpoint import CheckpointError, find_checkpoint_files, load_weights
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.layers import Runtime
from deepseek_mcp.inference.model.transformer import Transformer

pytest.importorskip("transformers")


def _ours(path: Path, fp8: bool, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits [S, V], MTP logits [S - 1, V]) through Transformer.forward then Transformer.draft."""
    cfg = ModelConfig.from_file(path)
    rt = Runtime(dtype=torch.float32, scale_fmt="ue8m0" if fp8 else None)
    model = Transformer(cfg, rt, fp8=fp8, mtp=True)
    load_weights(model, find_checkpoint_files(path))
    model.prepare_for_kernels_()
    block, n_blocks = 8, -(-len(ids) // 8)
    cache = torch.full((cfg.num_layers + 1, n_blocks, block, cfg.kv_cache_dim), float("nan"))  # poisoned
    table = list(range(n_blocks))
    x, pos, meta = build_batch([ScheduledSeq(ids, 0, table)], block, torch.device("cpu"), all_logits=True)
    logits, hidden = model(x, pos, meta, cache, return_hidden=True)  # [S, V], [S, D]
    # the MTP layer's prefill: rows 0..S-2 pair the state at t with the token at t + 1
    x, pos, meta = build_batch([ScheduledSeq(ids[1:], 0, table)], block, torch.device("cpu"), all_logits=True)
    draft, draft_hidden = model.draft(x, pos, hidden[:-1], meta, cache)
    assert draft_hidden.shape == (len(ids) - 1, cfg.hidden_size)
    return logits, draft


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_mtp_layer_matches_its_equations_in_float64(fp8: bool, tmp_path: Path) -> None:
    from helpers import fresh_seed

    seed = fresh_seed()
    path, hf_config, ref_tensors = mtp_checkpoint(tmp_path, fp8, seed % 1000)
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(seed)).tolist()
    want_main, want = mtp_logits_reference(hf_config, ref_tensors, ids)
    got_main, got = _ours(path, fp8, ids)
    assert got.shape == want.shape == (len(ids) - 1, hf_config.vocab_size)
    tol = 1e-4 * want.abs().max().item()  # fp32 activations against float64, weights identical
    assert (got_main.double() - want_main).abs().max().item() <= 1e-4 * want_main.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= tol, f"MTP logits off by {err} (tolerance {tol}, seed {seed})"
    # the layer depends on both halves: the main state and the next token (a swapped or dropped half fails)
    assert (want - want_main[1:]).abs().max().item() > 100 * tol


def test_demo_checkpoint_loads_its_mtp_layer() -> None:
    from deepseek_mcp.inference.model.demo import demo_checkpoint_path

    path = demo_checkpoint_path()
    cfg = ModelConfig.from_file(path)
    model = Transformer(cfg, Runtime(dtype=torch.bfloat16, scale_fmt="ue8m0"), fp8=True, mtp=True)
    load_weights(model, find_checkpoint_files(path))
    assert model.mtp is not None and model.mtp.eh_proj.weight.shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    with pytest.raises(ValueError, match="num_nextn_predict_layers = 0"):
        Transformer(ModelConfig.from_dict({**json.loads((path / "config.json").read_text()),
                                           "num_nextn_predict_layers": 0}), Runtime(), mtp=True, device="meta")


def test_missing_mtp_tensor_is_named(tmp_path: Path) -> None:
    path, _, _ = mtp_checkpoint(tmp_path, False, 3)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[f"model.layers.{MAIN_LAYERS}.eh_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    cfg = ModelConfig.from_file(path)
    model = Transformer(cfg, Runtime(dtype=torch.float32), mtp=True)
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) model\.layers\.{MAIN_LAYERS}\.eh_proj\.weight"):
        load_weights(model, find_checkpoint_files(path))
    plain = Transformer(cfg, Runtime(dtype=torch.float32))  # without the MTP layer nothing of it is needed
    load_weights(plain, find_checkpoint_files(path))
