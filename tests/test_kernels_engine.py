"""The engine with the Triton kernels (interpreter on CPU, native on CUDA) equals its torch path.

Tolerance: in a tiny random network, rounding differences are amplified layer by layer, and a 1% change can flip
a discrete top-k expert choice. The checkpoints here route every token to every expert (top-k = E, one group)
so the comparison is continuous, and the bar is what bf16 itself does to this network: the kernels may differ
from the torch path by at most a few times the torch path's own bf16-vs-fp32 difference.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_checkpoints import fp8_checkpoint_pair  # noqa: E402
from reference.fp8 import fp8_linear_torch  # noqa: E402
from reference.mla import mla_prefill_torch  # noqa: E402
from reference.moe import moe_grouped_gemm_torch  # noqa: E402

from deepseek_mcp.inference.engine.engine import Engine  # noqa: E402
from deepseek_mcp.inference.engine.sampling import SamplingParams  # noqa: E402

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return fp8_checkpoint_pair(tmp_path_factory.mktemp("kern"), top_k=8, n_group=1, topk_group=1)


def _load(path, dtype, backend):
    return Engine.from_pretrained(path, device=DEVICE, dtype=dtype, kernels=backend)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


IDS = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(4)).tolist()


def test_kernel_engine_keeps_fp8_and_fuses_experts(ckpts):
    kern = _load(ckpts["fp8"], "bfloat16", "triton")
    experts = kern.model.model.layers[1].mlp.experts
    assert kern.kernels == "triton" and kern.fp8
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.gate_proj is None
    assert kern.model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn


def test_kernel_logits_match_torch_path_bf16_weights(ckpts):
    """bf16 weights: the MLA prefill and grouped MoE kernels against the plain torch path."""
    f32 = _load(ckpts["deq"], "float32", "torch").logits(IDS, block_size=8)
    ref = _load(ckpts["deq"], "bfloat16", "torch").logits(IDS, block_size=8)
    got = _load(ckpts["deq"], "bfloat16", "triton").logits(IDS, block_size=8)
    bf16_noise = _rel(ref, f32)
    assert bf16_noise < 0.1
    assert _rel(got, ref) <= 2 * bf16_noise, f"kernels {_rel(got, ref):.4f} vs torch; bf16 noise {bf16_noise:.4f}"


def test_kernel_logits_match_twins_fp8(ckpts, monkeypatch):
    """FP8 weights: the kernels quantize activations to e4m3 per 1x128 group (as DeepSeek's FP8 GEMM does), which
    the dequantize-then-matmul torch path does not; so compare with the same engine running the kernels' twins."""

    from deepseek_mcp.kernels import fp8, mla, moe

    got = _load(ckpts["fp8"], "bfloat16", "triton").logits(IDS, block_size=8)
    monkeypatch.setattr(fp8, "fp8_linear", fp8_linear_torch)  # the model calls the modules' wrappers
    monkeypatch.setattr(mla, "mla_prefill", mla_prefill_torch)
    monkeypatch.setattr(moe, "moe_grouped_gemm", moe_grouped_gemm_torch)
    twins = _load(ckpts["fp8"], "bfloat16", "triton").logits(IDS, block_size=8)
    twins32 = _load(ckpts["fp8"], "float32", "triton").logits(IDS, block_size=8)
    noise = _rel(twins, twins32)  # what bf16 does to this FP8-activation path
    assert _rel(got, twins) <= 2 * noise, f"kernels {_rel(got, twins):.4f} vs twins; bf16 noise {noise:.4f}"
    assert _rel(got, twins32) <= 2 * noise


def test_kernel_decode_matches_torch_path(ckpts):
    prompts = [[5, 17, 99, 3, 42, 7, 8, 200, 13], [1, 2]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a = _load(ckpts["deq"], "bfloat16", "torch").generate(prompts, params, block_size=4)
    b = _load(ckpts["deq"], "bfloat16", "triton").generate(prompts, params, block_size=4)  # mla_decode steps
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
