"""The 4-bit representation (int4.py) and the three on-disk formats (quant_formats.py): packing against float64 and
against the official compressed-tensors library (its pack-quantized packer and compressor, and its AutoAWQ
converter, vLLM project code that unpacks AutoAWQ GEMM tensors); GPTQ against its specification (no GPTQ library
installs on a CPU-only machine: auto-gptq and gptqmodel build CUDA extensions); every reader on whole tensors and
on per-rank slices; and the refusals, each naming the tensor, key or sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_packers import dequantize, int4_checkpoint_pair, pack_module, pack_rows
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.model.checkpoint import CheckpointError
from deepseek_mcp.inference.model.config import ConfigError, ModelConfig
from deepseek_mcp.inference.model.int4 import dequant_int4, pack_int4, unpack_int4
from deepseek_mcp.inference.model.parallel import ParallelConfigError, Shard, TPContext
from deepseek_mcp.inference.model.quant_formats import Int4FormatError, parse_scheme, read_int4
from deepseek_mcp.inference.model.transformer import Runtime, Transformer


def _codes(n: int, k: int, group: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).to(torch.float16)
    z = torch.randint(0, 16, (n, k // group), generator=g)
    return u, s, z


def test_pack_and_dequantize_exactly_against_float64() -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    u, s, z = _codes(24, 64, 16, g)
    q = pack_int4(u)
    assert q.dtype == torch.int32 and q.shape == (24, 8)
    assert torch.equal(q, pack_rows(u))  # the tests' packer, written separately from the spec
    assert torch.equal(unpack_int4(q).long(), u)
    want = ((u.double().view(24, 4, 16) - z.double()[..., None]) * s.double()[..., None]).view(24, 64)
    got = dequant_int4(q, s.float(), z.to(torch.uint8), torch.float32)
    assert torch.equal(got.double(), want)  # (u - z) * fp16 scale is exact in fp32
    stacked = dequant_int4(torch.stack([q, q.flip(0)]), torch.stack([s, s.flip(0)]).float(),
                           torch.stack([z, z.flip(0)]).to(torch.uint8), torch.float32)  # [E, N, K] experts
    assert torch.equal(stacked[1], want.flip(0).float())


def _write(tmp: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp / "t.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _read(path: Path, scheme, n: int, k: int, shard: Shard | None):
    with safe_open(str(path), "pt") as f:
        def get(name: str):
            if name not in f.keys():
                raise Int4FormatError(f"tensor {name} is missing")
            return f.get_slice(name)

        return read_int4(scheme, get, "m", n, k, shard)


SCHEMES = {
    "compressed-tensors asym": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": 16}}}}, True, False),
    "compressed-tensors sym": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                 "strategy": "group", "group_size": 16}}}}, False, False),
    "gptq v1 sym": ({"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True, "desc_act": False}, False,
                    False),
    "gptq v2 asym": ({"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False, "desc_act": False,
                      "checkpoint_format": "gptq_v2"}, True, True),
    "awq gemm": ({"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}, True,
                 False),
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_readers_give_the_codes_whole_and_per_rank(case: str, tmp_path: Path) -> None:
    q_cfg, zero_point, v2 = SCHEMES[case]
    scheme = parse_scheme(q_cfg, "config.json")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    n, k = 32, 64
    u, s, z = _codes(n, k, 16, g)
    if not zero_point:
        z = torch.full_like(z, 8)
    path = _write(tmp_path, {f"m.{x}": t for x, t in pack_module(scheme.fmt, u, s, z, zero_point, v2).items()})
    qweight, scales, zeros = _read(path, scheme, n, k, None)
    assert torch.equal(unpack_int4(qweight).long(), u) and torch.equal(zeros.long(), z)
    assert scales.dtype == s.dtype and torch.equal(scales, s)  # kept as stored
    for dim, full in ((0, n), (1, k)):
        for rank in range(2):
            shard = Shard(dim, rank * full // 2, full // 2, full)
            part = _read(path, scheme, n, k, shard)
            rows = slice(shard.start, shard.start + shard.size) if dim == 0 else slice(None)
            cols = slice(shard.start, shard.start + shard.size) if dim == 1 else slice(None)
            gcols = slice(shard.start // 16, (shard.start + shard.size) // 16) if dim == 1 else slice(None)
            assert torch.equal(dequant_int4(*part, torch.float64), dequantize(u, s, z).double()[rows, cols])
            assert torch.equal(part[2].long(), z[rows, gcols])


def test_compressed_tensors_library_packs_and_decompresses_the_same() -> None:
    ct = pytest.importorskip("compressed_tensors")  # the official library: installs on CPU from PyPI
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    u, s, z = _codes(40, 96, 32, g)
    ours = pack_module("compressed-tensors", u, s.to(torch.bfloat16), z, zero_point=True)
    assert torch.equal(ours["weight_packed"], pack_to_int32((u - 8).to(torch.int8), 4))
    assert torch.equal(ours["weight_zero_point"], pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))
    weight = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    mine = dequant_int4(pack_int4(u), s.to(torch.bfloat16).float(), z.to(torch.uint8), torch.float32)
    assert ct.__version__ and torch.allclose(weight.float(), mine, rtol=1e-2, atol=0)  # library computes in bf16
    assert torch.equal(mine, dequantize(u, s.to(torch.bfloat16), z))


def test_awq_packing_matches_the_autoawq_converter() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    u, s, z = _codes(48, 64, 16, g)
    awq = {f"m.{x}": t for x, t in pack_module("awq", u, s, z, zero_point=True).items()}
    out = AutoAWQConverter(group_size=16).process(dict(awq))
    want = pack_module("compressed-tensors", u, s, z, zero_point=True)
    assert torch.equal(out["m.weight_packed"], want["weight_packed"])
    assert torch.equal(out["m.weight_zero_point"], want["weight_zero_point"])
    assert torch.equal(out["m.weight_scale"], s)


def test_gptq_words_follow_the_specification() -> None:
    """qweight[i, n] holds rows 8i..8i+7 of column n in nibbles 0..7; v1 qzeros hold z - 1, packed along N."""
    u = torch.zeros(8, 16, dtype=torch.long)  # W [N = 8, K = 16], one group
    u[0, :8] = torch.arange(8)  # column 0 of W^T, rows 0..7: codes 0..7
    u[1, 8:] = 15
    z = torch.full((8, 1), 8)
    z[1] = 0
    t = pack_module("gptq", u, torch.ones(8, 1, dtype=torch.float16), z, zero_point=False)
    assert t["qweight"].shape == (2, 8) and t["qweight"][0, 0].item() == 0x76543210
    assert t["qweight"][1, 1].item() == -1 and t["qweight"][0, 1].item() == 0  # 0xFFFFFFFF as int32
    assert t["qzeros"].shape == (1, 1)  # [K/G, N/8]: 8 - 1 in every nibble but N = 1's, (0 - 1) & 15
    assert t["qzeros"][0, 0].item() == 0x777777F7


def _ckpt(tmp_path: Path, fmt: str = "gptq", group: int = 16, **kw) -> Path:
    return int4_checkpoint_pair(tmp_path, fmt, group, False, **kw)["q"]


def _edit(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_or_misshaped_scales_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    q = _ckpt(tmp_path)
    name = "model.layers.1.mlp.experts.3.down_proj.scales"
    _edit(q, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor {name} is missing"):
        Engine.from_pretrained(q, device="cpu", dtype="float32")
    _edit(q, lambda t: t.update({name: torch.ones(3, 64, dtype=torch.float16)}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {name} has shape \(3, 64\), expected "
                                              r"\(2, 64\)"):
        Engine.from_pretrained(q, device="cpu", dtype="float32")
    wrong = "model.layers.0.self_attn.q_b_proj.qweight"
    _edit(q, lambda t: t.update({name: torch.ones(2, 64, dtype=torch.float16), wrong: t[wrong].float()}))
    with pytest.raises(CheckpointError, match=f"tensor {wrong} is torch.float32, expected torch.int32"):
        Engine.from_pretrained(q, device="cpu", dtype="float32")


def test_act_order_g_idx_and_unquantized_modules_are_refused(tmp_path: Path) -> None:
    q = _ckpt(tmp_path)
    name = "model.layers.2.self_attn.o_proj.g_idx"
    _edit(q, lambda t: t.update({name: t[name].flip(0).contiguous()}))
    with pytest.raises(CheckpointError, match=f"tensor {name} is not k // group_size.*act-order"):
        Engine.from_pretrained(q, device="cpu", dtype="float32")
    module = "model.layers.0.mlp.up_proj"

    def dense(t: dict) -> None:
        t[name] = torch.arange(64, dtype=torch.int32) // 16
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            t.pop(f"{module}.{suffix}")
        t[f"{module}.weight"] = torch.zeros(96, 64)

    _edit(q, dense)
    with pytest.raises(CheckpointError, match=f"stores {module}.weight unquantized.*modules_to_not_convert"):
        Engine.from_pretrained(q, device="cpu", dtype="float32")


@pytest.mark.parametrize("change, message", [
    ({"desc_act": True}, "desc_act true .act-order. is not supported: its g_idx scatters each quantization group"),
    ({"bits": 8}, "8-bit weights are not supported"),
    ({"lm_head": True}, "lm_head true is not supported"),
    ({"group_size": -1}, "group_size -1 is not supported"),
    ({"quant_method": "awq", "version": "gemv"}, "version 'gemv' is not supported"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
])
def test_unsupported_quantization_configs_are_refused(change: dict, message: str, tmp_path: Path) -> None:
    q = _ckpt(tmp_path)
    raw = json.loads((q / "config.json").read_text())
    raw["quantization_config"].update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw, "config.json")


def test_a_split_that_cuts_a_group_is_refused_naming_the_sizes(tmp_path: Path) -> None:
    raw = json.loads((_ckpt(tmp_path) / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw, "config.json")  # group 16
    Transformer(cfg, Runtime(dtype=torch.float32), device="meta", tp=TPContext(1, 2))  # whole groups
    with pytest.raises(ParallelConfigError, match=r"model.layers.0.mlp.down_proj: input size 96 over 4 rank\(s\) "
                                                  r"gives slices of 24, which cut the 16-wide quantization groups"):
        Transformer(cfg, Runtime(dtype=torch.float32), device="meta", tp=TPContext(0, 4))
    raw["quantization_config"]["group_size"] = 64
    with pytest.raises(ParallelConfigError, match="model.layers.0.self_attn.q_b_proj: input size 48 is not a "
                                                  "multiple of the quantization group size 64"):
        Transformer(ModelConfig.from_dict(raw, "config.json"), Runtime(dtype=torch.float32), device="meta")


@pytest.mark.parametrize("fmt, zero_point", [("compressed-tensors", True), ("gptq", False), ("awq", True)])
def test_each_rank_reads_half_of_every_4bit_expert(fmt: str, zero_point: bool, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks loaded in one process: every routed expert's codes, scales and zero points are read as slices,
    each rank exactly half of their bytes, and the two halves dequantize to the one-rank weight."""
    from test_parallel_load import Recorder

    from deepseek_mcp.inference.model import checkpoint
    from deepseek_mcp.inference.model.checkpoint import find_checkpoint_files, load_weights

    path = int4_checkpoint_pair(tmp_path, fmt, 16, zero_point)["q"]
    cfg, files = ModelConfig.from_file(path), find_checkpoint_files(path)
    payload = ("qweight", "qzeros", "scales", "weight_packed", "weight_scale", "weight_zero_point")
    with safe_open(str(files.weight_files[0]), "pt") as f:
        total = sum(f.get_tensor(n).nbytes for n in f.keys() if ".mlp.experts." in n and n.endswith(payload))
    rt = Runtime(dtype=torch.float32)
    whole = Transformer(cfg, rt)
    load_weights(whole, files)
    parts = []
    for rank in range(2):
        rec = Recorder()
        monkeypatch.setattr(checkpoint, "safe_open", rec.open)
        model = Transformer(cfg, rt, tp=TPContext(rank, 2))
        load_weights(model, files)
        expert_reads = [(n, i, b) for n, i, b in rec.reads if ".mlp.experts." in n and n.endswith(payload)]
        assert all(i is not None for _, i, _ in expert_reads), "a rank read a whole 4-bit expert tensor"
        assert 2 * sum(b for _, _, b in expert_reads) == total, rank
        parts.append(model.model.layers[1].mlp.experts)
    ex = whole.model.layers[1].mlp.experts
    for proj, dim in (("gate_proj", 1), ("down_proj", 2)):  # gate: rows of I; down: columns of I
        want = dequant_int4(getattr(ex, proj), getattr(ex, proj + "_scale"), getattr(ex, proj + "_zero"),
                            torch.float32)
        got = torch.cat([dequant_int4(getattr(p, proj), getattr(p, proj + "_scale"), getattr(p, proj + "_zero"),
                                      torch.float32) for p in parts], dim=dim)
        assert torch.equal(got, want), proj
