"""4-bit checkpoints end to end on CPU (the torch path, which dequantizes the weights a matmul reads per call): for
each on-disk format, a tiny DeepseekV3ForCausalLM (MoE layers with a shared expert, q_lora on) written by the
test packers (quant_packers.py) must give transformers' logits on the exact dequantized weights (fp32, within 1e-3
of the largest logit) and the same 32 greedy tokens, in one process and over 2 tensor-parallel ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_checkpoints import hf_greedy, hf_logits
from quant_packers import int4_checkpoint_pair

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.model.layers import Linear
from deepseek_mcp.inference.model.moe import Experts

pytest.importorskip("transformers")

# group sizes dividing every input size of the tiny model and of its 2-rank slices; AWQ at AutoAWQ's DeepSeek-V3
# group size 64 with attention left unquantized (modules_to_not_convert), as some V3 AWQ checkpoints do
FORMATS = {
    "compressed-tensors asymmetric, group 16": dict(fmt="compressed-tensors", group=16, zero_point=True),
    "gptq v1 symmetric, group 16": dict(fmt="gptq", group=16, zero_point=False),
    "awq gemm, group 64, attention unquantized": dict(fmt="awq", group=64, zero_point=True, skip=("self_attn",),
                                                      moe_intermediate_size=128, intermediate_size=128),
}
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=list(FORMATS))
def pair(request, tmp_path_factory):
    kw = dict(FORMATS[request.param])
    seed = int(torch.randint(0, 2**31, ()).item())
    dirs = int4_checkpoint_pair(tmp_path_factory.mktemp(kw["fmt"]), kw.pop("fmt"), seed=seed % 1000, **kw)
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(dirs["deq"]).eval()
    return dirs, hf, request.param, seed


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_logits(ours: Engine, hf, seed: int) -> None:
    ids = _prompt(40, seed)
    ref, got = hf_logits(hf, ids), ours.logits(ids)
    err = (got - ref).abs().max().item()
    assert err <= 1e-3 * ref.abs().max().item(), f"max abs error {err} vs largest logit {ref.abs().max()}"


def test_prefill_logits_and_greedy_match_transformers(pair) -> None:
    dirs, hf, case, seed = pair
    ours = Engine.from_pretrained(dirs["q"], device="cpu", dtype="float32")
    quantized, total = count_int4_linears(ours.model)
    skips_attention = "attention unquantized" in case
    assert quantized > 0 and (quantized < total) == skips_attention, (quantized, total)
    _check_logits(ours, hf, seed)
    prompts = [_prompt(n, seed + n) for n in (5, 17)]
    want = [hf_greedy(hf, p, 32) for p in prompts]
    assert [o.token_ids for o in ours.generate(prompts, GREEDY)] == want


@pytest.mark.slow
def test_two_ranks_match_transformers(pair) -> None:
    dirs, hf, _, seed = pair
    with Engine.from_pretrained(dirs["q"], device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=60) as tp:
        _check_logits(tp, hf, seed + 1)
        prompt = _prompt(9, seed + 2)
        assert tp.generate([prompt], GREEDY)[0].token_ids == hf_greedy(hf, prompt, 32)


def test_triton_path_matches_transformers(pair) -> None:
    """The Triton path through the interpreter: W4A16 GEMMs for the 4-bit Linears, the 4-bit grouped MoE GEMM
    with the shared expert stacked as one more expert (fp32 activations, IEEE dots)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    dirs, hf, case, seed = pair
    ours = Engine.from_pretrained(dirs["q"], device="cpu", dtype="float32", kernels="triton")
    moe = ours.model.model.layers[1].mlp
    assert moe.shared_experts is None and moe.experts.gate_up_proj.dtype == torch.int32  # stacked, still 4-bit
    _check_logits(ours, hf, seed)
    prompt = _prompt(7, seed + 3)
    assert ours.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids == \
        hf_greedy(hf, prompt, 4)


def test_generate_cli_runs_a_4bit_checkpoint(tmp_path: Path) -> None:
    """`python -m deepseek_mcp.inference generate` on a GPTQ checkpoint with the full V3 vocabulary (the bundled
    tokenizer's ids must fit the embedding)."""
    dirs = int4_checkpoint_pair(tmp_path, "gptq", 16, False, vocab_size=129280)
    out = subprocess.run([sys.executable, "-m", "deepseek_mcp.inference", "generate", "--model", str(dirs["q"]),
                          "--device", "cpu", "--max-tokens", "8", "--prompt", "hello"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "no generated text"


def count_int4_linears(model) -> tuple[int, int]:
    """(4-bit weights, all Linear and expert weights) of a loaded model, each expert counted once per projection;
    and every 4-bit one holds only codes [N, K/8] int32, 16/32-bit scales and uint8 zeros [N, K/G], no dense
    copy."""
    quantized = total = 0
    for name, m in model.named_modules():
        if not isinstance(m, (Linear, Experts)) or name == "lm_head":  # the head stays in the activation dtype
            continue
        n_weights = 1 if isinstance(m, Linear) else 3 * m.down_proj.shape[0]
        total += n_weights
        if m.int4_group:
            quantized += n_weights
            dtypes = {p.dtype for p in m.parameters(recurse=False)}
            scale_dtypes = {torch.float16, torch.bfloat16, torch.float32}  # as the checkpoint stores them
            assert len(dtypes & scale_dtypes) == 1 and dtypes - scale_dtypes == {torch.int32, torch.uint8}, name
            for p in m.parameters(recurse=False):
                if p.dtype == torch.int32:  # codes: 8 per word
                    scale = next(q for q in m.parameters(recurse=False) if q.is_floating_point()
                                 and q.shape[:-1] == p.shape[:-1])
                    assert p.shape[-1] * 8 == scale.shape[-1] * m.int4_group, name
    return quantized, total
