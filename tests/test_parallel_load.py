"""Per-rank loading, in one process (no collectives at load): instrumented safetensors reads show each rank read
only its slices (of every expert too: its part of the intermediate size), exactly 1/N of the routed experts'
weight bytes, and the slices it holds equal the single-process weights."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from deepseek_mcp.inference.model import checkpoint
from deepseek_mcp.inference.model.checkpoint import find_checkpoint_files, load_weights
from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.demo import demo_checkpoint_path
from deepseek_mcp.inference.model.layers import FP8_DTYPE, Runtime
from deepseek_mcp.inference.model.parallel import ParallelConfigError, TPContext, check_divisible
from deepseek_mcp.inference.model.transformer import Transformer

RT = Runtime(dtype=torch.float32, scale_fmt="ue8m0")


class Recorder:
    """Wraps safe_open: every tensor read, as (name, index or None for a whole tensor, bytes)."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, tuple | None, int]] = []

    def open(self, path: str, framework: str, device: str = "cpu"):
        real, reads = safe_open(path, framework, device=device), self.reads

        class Slice:
            def __init__(self, sl):
                self.sl = sl

            def get_shape(self):
                return self.sl.get_shape()

            def __getitem__(self, index):
                t = self.sl[index]
                reads.append((self.name, index, t.nbytes))
                return t

        class Handle:
            def __enter__(self):
                self.f = real.__enter__()
                return self

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                t = self.f.get_tensor(name)
                reads.append((name, None, t.nbytes))
                return t

            def get_slice(self, name):
                s = Slice(self.f.get_slice(name))
                s.name = name
                return s

        return Handle()


@pytest.fixture(scope="module")
def demo():
    path = demo_checkpoint_path()
    cfg, files = ModelConfig.from_file(path), find_checkpoint_files(path)
    full = Transformer(cfg, RT, fp8=True)
    load_weights(full, files)
    full.dequantize_fp8_()
    return cfg, files, full


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_only_its_slices(demo, world_size: int, monkeypatch) -> None:
    cfg, files, full = demo
    full_params = dict(full.named_parameters())
    expert_bytes = sum(t for _, _, t in _all_expert_reads(files))
    for rank in range(world_size):
        rec = Recorder()
        monkeypatch.setattr(checkpoint, "safe_open", rec.open)
        model = Transformer(cfg, RT, True, "cpu", TPContext(rank, world_size))
        load_weights(model, files)
        params = dict(model.named_parameters())
        read_experts = 0
        for name, index, nbytes in rec.reads:
            pname = _param_name(name)
            if pname not in params:  # the scales of a slice held dequantized: read with its weight
                pname = pname.removesuffix("_scale_inv")
            if ".mlp.experts." in name and name.endswith(".weight"):
                read_experts += nbytes
            shard = getattr(params.get(pname), "shard", None)
            if shard is None:
                assert index is None, f"{name} is replicated but was read as a slice"
                continue
            assert index is not None, f"rank {rank} read all of {name}, a sharded tensor"
            lo, hi = index[shard.dim].start, index[shard.dim].stop
            if name.endswith("_scale_inv"):  # the scale blocks covering the weight's slice
                b = RT.fp8_block
                start = shard.start if shard.dequant_block else shard.start * b
                assert lo == start // b and hi >= lo + 1
            else:
                assert (lo, hi) == (shard.start, shard.start + shard.size), f"{name}: read {lo}:{hi}"
        assert read_experts * world_size == expert_bytes  # exactly its share of the routed experts' weights
        _check_values(model, full_params, rank, world_size, cfg)


def _param_name(name: str) -> str:
    """The parameter a checkpoint tensor loads into (routed experts: their stacked parameter)."""
    m = re.match(r"^(.*\.mlp\.experts)\.\d+\.(\w+)\.weight(_scale_inv)?$", name)
    return f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}" if m else name


def _all_expert_reads(files):
    for path in files.weight_files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.", name)
                if m and int(m.group(1)) < 4 and name.endswith(".weight"):
                    t = f.get_slice(name)
                    shape, n = t.get_shape(), 1
                    for d in shape:
                        n *= d
                    yield name, None, n * (1 if t.get_dtype() == "F8_E4M3" else 4)


def _check_values(model, full_params, rank: int, n: int, cfg: ModelConfig) -> None:
    layer = model.model.layers[1]
    full = lambda name: full_params[name]  # noqa: E731
    q_b = layer.self_attn.q_b_proj.weight  # [H/N * 96, 128]: cuts a 128-row scale block for N=2, 4
    rows = q_b.shape[0]
    assert q_b.dtype == torch.float32 and rows == cfg.num_heads // n * cfg.qk_head_dim
    assert torch.equal(q_b, full("model.layers.1.self_attn.q_b_proj.weight")[rank * rows : (rank + 1) * rows])
    kv_b = layer.self_attn.kv_b_proj  # [H/N * 128, 128]: whole blocks, kept in FP8 with its scale rows
    assert kv_b.weight.dtype == FP8_DTYPE
    got = kv_b.dense_weight(torch.float32)
    r = got.shape[0]
    assert torch.equal(got, full("model.layers.1.self_attn.kv_b_proj.weight")[rank * r : (rank + 1) * r])
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size // n  # every expert, rows [rank * i, (rank + 1) * i)
    assert torch.equal(layer.mlp.experts._weights("up_proj", torch.arange(e), torch.float32),
                       full("model.layers.1.mlp.experts.up_proj")[:, rank * i : (rank + 1) * i])
    assert torch.equal(layer.mlp.experts._weights("down_proj", torch.arange(e), torch.float32),
                       full("model.layers.1.mlp.experts.down_proj")[:, :, rank * i : (rank + 1) * i])
    down = layer.mlp.shared_experts.down_proj.dense_weight(torch.float32)  # column slice
    c = down.shape[1]
    assert torch.equal(down, full("model.layers.1.mlp.shared_experts.down_proj.weight")[:, rank * c : (rank + 1) * c])
    emb = model.model.embed_tokens.weight  # padded vocabulary rows stay zero
    v = emb.shape[0]
    ref = full("model.embed_tokens.weight")[rank * v : (rank + 1) * v]
    assert torch.equal(emb[: ref.shape[0]], ref) and not emb[ref.shape[0] :].any()


def test_refused_sizes_are_named() -> None:
    cfg = ModelConfig.from_file(demo_checkpoint_path())
    with pytest.raises(ParallelConfigError, match=r"size 8 does not divide num_attention_heads = 4"):
        check_divisible(cfg, 8)
    check_divisible(cfg, 4)
