"""Engine core: FP8 checkpoints, the paged latent cache, routing, config parsing, loader errors, demo format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hf_checkpoints import fp8_checkpoint_pair, tiny_hf_model
from reference.fp8 import weight_dequant_torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.runner import CacheMemoryError, cache_bytes_per_token
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.model.checkpoint import CheckpointError
from deepseek_mcp.inference.model.config import ConfigError, ModelConfig
from deepseek_mcp.inference.model.demo import DEMO_CONFIG, quantize_fp8_blockwise, write_demo_checkpoint
from deepseek_mcp.inference.model.moe import route


def _rand_ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    return fp8_checkpoint_pair(tmp_path_factory.mktemp("fp8pair"))


def test_fp8_checkpoint_matches_its_dequantization(fp8_pair):
    fp8 = Engine.from_pretrained(fp8_pair["fp8"], device="cpu", dtype="float32")
    deq = Engine.from_pretrained(fp8_pair["deq"], device="cpu", dtype="float32")
    assert fp8.fp8 and not deq.fp8
    w = fp8.model.model.layers[1].mlp.experts.gate_proj
    assert w.dtype == torch.float8_e4m3fn  # kept as FP8 in memory
    ids = _rand_ids(24, 3)
    a, b = fp8.logits(ids), deq.logits(ids)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()
    once = Engine.from_pretrained(fp8_pair["fp8"], device="cpu", dtype="float32", dequantize_fp8=True)
    assert once.model.model.layers[1].mlp.experts.gate_proj.dtype == torch.float32
    assert (once.logits(ids) - b).abs().max().item() <= 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("shape", [(128, 128), (200, 77), (300, 260), (1, 129)])
def test_dequant_is_exact_block_by_block(shape):
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * 3
    q, s = quantize_fp8_blockwise(w)
    assert torch.all(torch.log2(s) == torch.round(torch.log2(s)))  # UE8M0: powers of two
    got = weight_dequant_torch(q, s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            assert torch.equal(got[blk], q[blk].float() * s[i, j])
    assert (got - w).abs().max() <= w.abs().max() * 2**-3  # e4m3 keeps 3 mantissa bits


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_model(path, seed=11)
    return Engine.from_pretrained(path, device="cpu", dtype="float32")


def test_paged_decode_matches_full_prefill(tiny_engine):
    """Token-by-token decode through shuffled, non-contiguous blocks gives the full-prefill logits."""
    eng, bs = tiny_engine, 4
    lengths = [13, 6, 21]
    prompts = [_rand_ids(n, 20 + n) for n in lengths]
    full = [eng.logits(p) for p in prompts]
    need = [-(-n // bs) for n in lengths]
    perm = torch.randperm(sum(need), generator=torch.Generator().manual_seed(5)).tolist()
    tables, k = [], 0
    for n in need:
        tables.append(perm[k : k + n])
        k += n
    runner = eng.make_runner(sum(need), bs)
    runner.kv_cache.fill_(float("nan"))  # poisoned: any read of an unwritten slot shows up
    # Prefill 3 tokens each (unequal batch), then one token per step; sequences finish at different steps.
    start = [3, 3, 3]
    out = runner.run([ScheduledSeq(p[:3], 0, t) for p, t in zip(prompts, tables)])
    for b in range(3):
        assert torch.allclose(out[b], full[b][2], atol=1e-4 * full[b].abs().max().item(), rtol=0)
    while True:
        live = [b for b in range(3) if start[b] < lengths[b]]
        if not live:
            break
        out = runner.run([ScheduledSeq([prompts[b][start[b]]], start[b], tables[b]) for b in live])
        for row, b in enumerate(live):
            ref = full[b][start[b]]
            assert (out[row] - ref).abs().max().item() <= 1e-4 * full[b].abs().max().item()
            start[b] += 1


def test_chunked_prefill_matches_full_prefill(tiny_engine):
    eng, bs = tiny_engine, 4
    ids = _rand_ids(30, 9)
    full = eng.logits(ids)
    runner = eng.make_runner(8, bs)
    table = [7, 2, 5, 0, 3, 1, 6, 4]
    pos = 0
    for chunk in (7, 1, 10, 12):  # chunks that end mid-block
        out = runner.run([ScheduledSeq(ids[pos : pos + chunk], pos, table)], all_logits=True)
        assert (out - full[pos : pos + chunk]).abs().max().item() <= 1e-4 * full.abs().max().item()
        pos += chunk


def test_cache_bytes_per_token_is_latent_only():
    cfg = ModelConfig.from_dict(DEMO_CONFIG)
    assert cache_bytes_per_token(cfg, torch.bfloat16) == (128 + 32) * 4 * 2


def test_routing_masks_unselected_groups_with_minus_inf():
    cfg = ModelConfig.from_dict({**DEMO_CONFIG, "n_routed_experts": 8, "n_group": 4, "topk_group": 1,
                                 "num_experts_per_tok": 2})
    # Group 0 (experts 0,1) has the best group score but negative biased scores; groups 1-3 score 0 + bias.
    logits = torch.tensor([[0.0, 0.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0]])
    bias = torch.tensor([-0.6, -0.7, -0.95, -0.95, -0.95, -0.95, -0.95, -0.95])
    w, idx = route(logits, bias, cfg)
    assert sorted(idx[0].tolist()) == [0, 1]  # masking with 0 would pick experts from other groups
    assert torch.allclose(w.sum(), torch.tensor(cfg.routed_scaling_factor))


def test_routing_weights_use_unbiased_scores():
    cfg = ModelConfig.from_dict({**DEMO_CONFIG, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                 "num_experts_per_tok": 2, "norm_topk_prob": False})
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # bias picks expert 2; its weight stays sigmoid(0)
    w, idx = route(logits, bias, cfg)
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert set(got) == {0, 2}
    assert math.isclose(got[2], 0.5 * 2.5, rel_tol=1e-6)
    assert math.isclose(got[0], torch.sigmoid(torch.tensor(2.0)).item() * 2.5, rel_tol=1e-6)


def test_config_accepts_both_rope_keys_and_null_q_lora():
    a = ModelConfig.from_dict(DEMO_CONFIG)
    new = {k: v for k, v in DEMO_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    params = dict(DEMO_CONFIG["rope_scaling"], rope_theta=10000)
    params["rope_type"] = params.pop("type")
    b = ModelConfig.from_dict({**new, "rope_parameters": params, "q_lora_rank": None})
    assert a.rope == b.rope and a.rope.type == "yarn" and a.rope.factor == 40
    assert b.q_lora_rank is None
    assert a.quant is not None and a.quant.scale_fmt == "ue8m0" and a.quant.block_size == (128, 128)
    assert a.softmax_scale == pytest.approx(96**-0.5 * (0.1 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method 'bitsandbytes'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 3}}, "3-bit weights are not supported"),
    ({"n_group": 3}, "not divisible by n_group"),
    ({"hidden_size": None}, "hidden_size must be a positive integer"),
])
def test_config_errors_name_the_cause(change, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict({**DEMO_CONFIG, **change}, source="x/config.json")


def _copy_ckpt(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_hf_model(path, seed=3)
    return path


def test_loader_missing_tensor(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    _copy_ckpt(tiny_ckpt, d)
    ts = load_file(str(d / "model.safetensors"))
    del ts["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(ts, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        Engine.from_pretrained(d, device="cpu")


def test_loader_wrong_shape_names_file_tensor_and_shapes(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    _copy_ckpt(tiny_ckpt, d)
    ts = load_file(str(d / "model.safetensors"))
    ts["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    save_file(ts, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.o_proj\.weight "
                                              r"has shape \(64, 60\), expected \(64, 64\)"):
        Engine.from_pretrained(d, device="cpu")


def test_loader_unsupported_dtype(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    _copy_ckpt(tiny_ckpt, d)
    ts = load_file(str(d / "model.safetensors"))
    ts["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    save_file(ts, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has unsupported dtype torch\.int32"):
        Engine.from_pretrained(d, device="cpu")


def test_loader_truncated_file(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    _copy_ckpt(tiny_ckpt, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated or corrupt)"):
        Engine.from_pretrained(d, device="cpu")


def test_loader_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        Engine.from_pretrained(tmp_path / "nowhere", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({**DEMO_CONFIG}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Engine.from_pretrained(tmp_path, device="cpu")


def test_prompt_longer_than_context_and_oversized_cache(tiny_engine):
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        tiny_engine.generate([[1] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(CacheMemoryError, match="lower the `cache_tokens` setting"):
        tiny_engine.make_runner(num_blocks=2**40, block_size=16)


def test_demo_checkpoint_is_in_the_real_format_and_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_demo_checkpoint(a)
    write_demo_checkpoint(b)
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f"{f.name} differs between two writes"
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["rope_scaling"]["type"] == "yarn"
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0" and cfg["vocab_size"] == 129280
    mc = ModelConfig.from_dict(cfg)
    assert mc.hidden_size % 128 == 0 and mc.hidden_size >= 256 and mc.num_layers >= 4
    assert mc.first_k_dense_replace >= 1 and mc.num_layers - mc.first_k_dense_replace >= 3
    assert mc.n_routed_experts >= 16 and mc.num_experts_per_tok == 4 and mc.n_group == 4 and mc.n_shared_experts == 1
    dtypes = {}
    for shard in shards:
        with safe_open(str(a / shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                dtypes[k] = t.dtype
                if k.endswith("weight_scale_inv"):
                    assert torch.all(torch.log2(t) == torch.round(torch.log2(t))), k
    assert dtypes["model.layers.1.mlp.experts.0.up_proj.weight"] == torch.float8_e4m3fn
    assert dtypes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == torch.float8_e4m3fn
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.input_layernorm.weight"] == torch.bfloat16
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    assert any(k.startswith(f"model.layers.{mc.num_layers}.") for k in dtypes)  # MTP layer present, then skipped


def test_demo_engine_generates_with_seed_reproducibility():
    eng = Engine.from_pretrained(None, device="cpu")
    assert eng.is_demo and eng.fp8 and eng.tokenizer.vocab_size <= eng.config.vocab_size
    ids = eng.tokenizer.encode("def hello():")
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=6)
    a = eng.generate([ids], p)[0]
    b = eng.generate([ids, ids[:2]], [p, SamplingParams(max_tokens=3)])[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6 and a.finish_reason == "length"


def _hub_offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as hub_constants  # read at import time: patch the module, not the env

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_repo_id_offline_and_absent_is_a_clear_error(tmp_path, monkeypatch):
    _hub_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache .*huggingface-cli download"):
        Engine.from_pretrained("some-org/absent-model", device="cpu")


def test_repo_id_resolves_through_the_hub_cache_offline(tiny_ckpt, tmp_path, monkeypatch):
    """A model already in huggingface_hub's cache loads by repo id with no network."""
    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny-v3"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    _hub_offline(monkeypatch, hub)
    eng = Engine.from_pretrained("some-org/tiny-v3", device="cpu", dtype="float32")
    assert eng.config.hidden_size == 64 and eng.name == "some-org/tiny-v3"
