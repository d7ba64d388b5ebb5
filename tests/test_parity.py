"""Parity with transformers' DeepseekV3ForCausalLM on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import hf_greedy, hf_logits, tiny_hf_model

from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams

pytest.importorskip("transformers")

CASES = {
    "q_lora+yarn+groups": dict(q_lora_rank=48, yarn=True, n_group=2, topk_group=1),
    "no_q_lora+yarn": dict(q_lora_rank=None, yarn=True, n_group=4, topk_group=2),
    "q_lora+no_rope_scaling": dict(q_lora_rank=48, yarn=False, n_group=1, topk_group=1),
    "legacy_rope_scaling_key": dict(q_lora_rank=48, yarn=True, n_group=2, topk_group=1, legacy_rope=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    hf = tiny_hf_model(path, seed=len(request.param), **CASES[request.param])
    if CASES[request.param].get("legacy_rope"):  # the reference reads the legacy file too
        from transformers import DeepseekV3ForCausalLM

        hf = DeepseekV3ForCausalLM.from_pretrained(path).eval()
    ours = Engine.from_pretrained(path, device="cpu", dtype="float32")
    return hf, ours


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_match(pair):
    hf, ours = pair
    ids = _prompt(40, 1)
    ref = hf_logits(hf, ids)
    got = ours.logits(ids)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"max abs error {err}"


def test_greedy_single_and_batched(pair):
    hf, ours = pair
    prompts = [_prompt(n, seed) for n, seed in ((5, 2), (17, 3), (33, 4))]
    expected = [hf_greedy(hf, p, 32) for p in prompts]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    single = ours.generate([prompts[0]], params)[0].token_ids
    assert single == expected[0]
    batched = [o.token_ids for o in ours.generate(prompts, params)]
    assert batched == expected
