"""The CPU's oneDNN-packed linear layers (inference/model/onednn.py): the op against a float64 reference, the
packed Linear against the unpacked one, and a bf16 engine with and without packing against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_mcp.inference.model import onednn
from deepseek_mcp.inference.model.layers import Linear, Runtime

HAVE = onednn.probe(torch.bfloat16)
needs_onednn = pytest.mark.skipif(not HAVE, reason="this torch build cannot run oneDNN's packed bf16 linear")


def _rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


@needs_onednn
@pytest.mark.parametrize("m,n,k", [(1, 48, 96), (3, 129, 77), (17, 256, 128), (1, 4099, 64), (64, 300, 512)])
def test_linear_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w, x = _rand(n, k, g=g), _rand(m, k, g=g)
    ref = F.linear(x.double(), w.double())  # [M, N]
    got = onednn.linear(x, onednn.pack(w))
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # bf16 output: half an ulp of the largest entry bounds the rounding; accumulation is in fp32
    bound = ref.abs().max().item() * 2**-8 + x.double().abs() @ w.double().abs().T * 2**-20
    assert ((got.double() - ref).abs() <= bound).all()
    # no worse than F.linear on the same bf16 inputs
    base = (F.linear(x, w).double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1.01 * base + 1e-6


@needs_onednn
def test_pack_round_trips_and_reads_any_input_layout():
    g = torch.Generator().manual_seed(11)
    w = _rand(96, 160, g=g)
    wp = onednn.pack(w)
    assert wp.is_mkldnn and wp.shape == w.shape
    assert torch.equal(onednn.unpack(wp), w)
    x = _rand(5, 2, 320, g=g)[:, :, ::2]  # [5, 2, 160], strided
    ref = F.linear(x.double(), w.double())
    got = onednn.linear(x, wp)
    assert got.shape == (5, 2, 96)
    assert (got.double() - ref).abs().max().item() <= ref.abs().max().item() * 2**-7
    assert onednn.linear(x[:0, 0], wp).shape == (0, 96)


def test_probe_refuses_what_it_does_not_pack():
    assert not onednn.probe(torch.float32)
    assert not onednn.probe(torch.float8_e4m3fn)
    w = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert not onednn.supported(w, dtype_ok=False)
    assert not onednn.supported(w.float(), dtype_ok=True)
    assert not onednn.supported(torch.zeros(8, 8, dtype=torch.bfloat16, device="meta"), dtype_ok=True)


@needs_onednn
def test_packed_linear_module():
    g = torch.Generator().manual_seed(3)
    lin = Linear(128, 200, Runtime(dtype=torch.bfloat16), fp8=False, device=torch.device("cpu"))
    w = _rand(200, 128, g=g)
    lin.weight.data.copy_(w)
    x = _rand(7, 128, g=g)
    before = lin(x)
    lin.pack_cpu_(dtype_ok=True)
    assert lin.packed and lin.weight.is_mkldnn
    assert torch.equal(lin.dense_weight(torch.bfloat16), w)  # unpacked for the rare reader of the dense weight
    after = lin(x)
    ref = F.linear(x.double(), w.double())
    assert (after.double() - ref).abs().max().item() <= 1.01 * (before.double() - ref).abs().max().item() + 1e-6
    assert lin(x.float()).dtype == torch.float32  # another dtype: the dense weight, as before packing
    fp8 = Linear(128, 128, Runtime(dtype=torch.bfloat16), fp8=True, device=torch.device("cpu"))
    fp8.pack_cpu_(dtype_ok=True)
    assert not fp8.packed  # FP8 weights are dequantized per use on the torch path, never packed


@needs_onednn
def test_bf16_engine_packed_against_unpacked_and_transformers(tmp_path):
    pytest.importorskip("transformers")
    from hf_checkpoints import hf_logits, tiny_hf_model

    from deepseek_mcp.inference.engine.engine import Engine

    hf = tiny_hf_model(tmp_path, seed=5, hidden=128)
    packed = Engine.from_pretrained(tmp_path, device="cpu", dtype="bfloat16", kernels="torch")
    plain = Engine.from_pretrained(tmp_path, device="cpu", dtype="bfloat16", kernels="torch", cpu_prepack=False)
    linears = [m for m in packed.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed for m in linears)  # every dense bf16 projection, the output head included
    assert not any(m.packed for m in plain.model.modules() if isinstance(m, Linear))
    assert packed.weight_bytes == plain.weight_bytes  # the packed layout holds the same bytes (list_models)
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(9)).tolist()
    ref = hf_logits(hf, ids)  # fp32 weights: the bf16 engines round them
    got, base = packed.logits(ids), plain.logits(ids)
    scale = ref.abs().max().item()
    assert (got - base).abs().max().item() <= 0.02 * scale
    assert (got - ref).abs().max().item() <= 1.25 * (base - ref).abs().max().item() + 1e-3 * scale
