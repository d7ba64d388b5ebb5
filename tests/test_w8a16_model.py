"""FP8 checkpoints on GPUs without FP8 tensor cores (compute capability below 8.9): the weights stay FP8 and the
Triton path runs the W8A16 kernels (kernels/w4a16.py, e4m3 dequantized in registers, activations unquantized),
so its logits equal transformers' on the exact dequantized weights (fp32, within 1e-4 of the largest logit).
Without such a GPU the choice is forced (`fp8_gemm_runs` patched) and the kernels run in the interpreter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hf_checkpoints import fp8_checkpoint_pair, hf_greedy, hf_logits

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.model.layers import FP8_DTYPE

pytest.importorskip("transformers")


def test_fp8_checkpoint_runs_w8a16_without_dequantizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    from transformers import DeepseekV3ForCausalLM

    from deepseek_mcp.kernels import platform

    monkeypatch.setattr(platform, "fp8_gemm_runs", lambda device, kernels: False)  # as on an A100
    dirs = fp8_checkpoint_pair(tmp_path)  # hidden 192: one full 128 block and a 64-wide edge block
    hf = DeepseekV3ForCausalLM.from_pretrained(dirs["deq"]).eval()
    ours = Engine.from_pretrained(dirs["fp8"], device="cpu", dtype="float32", kernels="triton")
    layer = ours.model.model.layers[1]
    assert ours.model.rt.w8a16 and layer.self_attn.o_proj.weight.dtype == FP8_DTYPE
    assert layer.mlp.experts.gate_up_proj.dtype == FP8_DTYPE and not layer.post_attention_layernorm.quantize
    ids = torch.randint(2, 256, (33,)).tolist()
    ref, got = hf_logits(hf, ids), ours.logits(ids)
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"max abs error {err} vs largest logit {ref.abs().max()}"
    prompt = ids[:6]
    assert ours.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids == \
        hf_greedy(hf, prompt, 4)
