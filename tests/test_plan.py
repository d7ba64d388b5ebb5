"""The memory planner against the parameters a rank's `Transformer` really allocates (built on the meta device): the
real DeepSeek-V3.1 config split over 8 and 16 ranks, and the demo's, whose N=2 split cuts FP8 scale blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepseek_mcp.inference.model.config import ModelConfig
from deepseek_mcp.inference.model.demo import demo_checkpoint_path
from deepseek_mcp.inference.model.parallel import TPContext
from deepseek_mcp.inference.model.plan import GIB, KINDS, main, plan, weight_bytes
from deepseek_mcp.inference.model.transformer import Runtime, Transformer


def _fixtures() -> Path | None:
    """`shared/fixtures` beside the repository or beside any folder above it (as in CI and /work)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures"
        if candidate.is_dir():
            return candidate
    return None


FIXTURES = _fixtures()
V31 = FIXTURES / "deepseek_v31_config.json" if FIXTURES else None
needs_v31 = pytest.mark.skipif(V31 is None or not V31.is_file(), reason="shared/fixtures is absent")


def _kind(name: str) -> str:
    if name.startswith(("model.embed_tokens", "lm_head")):
        return "embedding_and_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name or "layernorm" in name or name == "model.norm.weight":
        return "norms_and_router"
    assert ".mlp." in name, name
    return "dense_mlp"


def _meta_bytes(cfg: ModelConfig, n: int, rank: int, fp8: bool, mtp: bool = False) -> dict[str, int]:
    rt = Runtime(dtype=torch.bfloat16, scale_fmt=cfg.quant.scale_fmt if cfg.quant else None)
    model = Transformer(cfg, rt, fp8, "meta", TPContext(rank, n), mtp=mtp)
    model.prepare_for_kernels_()  # the step's layout: W_UK / W_UV dense, the router in fp32, fusions
    out = dict.fromkeys(KINDS, 0)
    for name, p in model.named_parameters():
        out["mtp_layer" if name.startswith("mtp.") else _kind(name)] += p.numel() * p.element_size()
    return out


@needs_v31
@pytest.mark.parametrize("n", [8, 16])
def test_v31_per_rank_bytes_equal_the_meta_model(n: int) -> None:
    cfg = ModelConfig.from_file(V31)
    for rank in (0, n - 1):
        assert weight_bytes(cfg, n, rank, fp8=True) == _meta_bytes(cfg, n, rank, True)
    p = plan(cfg, n, 139 * GIB)
    assert p.fits and p.cache_bytes_per_token == 61 * 576 * 2
    # with the multi-token-prediction layer (speculative decoding): one more block, one more cache layer
    for rank in (0, n - 1):
        assert weight_bytes(cfg, n, rank, fp8=True, mtp=True) == _meta_bytes(cfg, n, rank, True, mtp=True)
    with_mtp = plan(cfg, n, 139 * GIB, mtp=True)
    assert with_mtp.cache_bytes_per_token == 62 * 576 * 2
    assert 0.5 * GIB < with_mtp.weights["mtp_layer"] < 2.5 * GIB  # ~11.7 GiB in FP8 (mostly experts) over n ranks
    total = sum(weight_bytes(cfg, 1, 0, fp8=True).values())
    assert 600 * GIB < total < 650 * GIB  # ~671B parameters in FP8, the MTP layer not loaded
    assert p.weights_total < total / n + 2.5 * GIB  # only q_a/kv_a, norms and the router are replicated


def test_demo_split_with_cut_scale_blocks_equals_the_meta_model() -> None:
    cfg = ModelConfig.from_file(demo_checkpoint_path())
    for n in (1, 2, 4):
        for rank in range(n):
            assert weight_bytes(cfg, n, rank, fp8=True) == _meta_bytes(cfg, n, rank, True), (n, rank)


@needs_v31
def test_plan_cli_names_what_would_fit(capsys) -> None:
    assert main(["--model", str(V31), "--tensor-parallel-size", "8", "--gpu-memory-gib", "139"]) == 0
    out = capsys.readouterr().out
    assert "replicated on every rank" in out and "routed_experts" in out and "skipped, not loaded" in out
    assert main(["--model", str(V31), "--tensor-parallel-size", "8", "--gpu-memory-gib", "79"]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "smallest tensor-parallel size that fits at 79 GiB per GPU is 16" in err
    assert main(["--model", str(V31), "--tensor-parallel-size", "3", "--gpu-memory-gib", "139"]) == 2
    assert "does not divide num_attention_heads = 128" in capsys.readouterr().err


@needs_v31
def test_server_refuses_a_plan_that_does_not_fit_before_loading() -> None:
    import anyio

    from deepseek_mcp.mcp_server.config import ServerConfig
    from deepseek_mcp.mcp_server.model_host import ModelHost

    host = ModelHost(ServerConfig(model=str(V31), tensor_parallel_size=8, device="cpu"))

    async def main() -> None:
        async with host.running():
            with anyio.fail_after(20):
                while host.status == "loading":
                    await anyio.sleep(0.02)

    anyio.run(main)
    assert host.status == "failed" and host.engine is None
    assert "PlanError: does not fit: 8 rank(s)" in host.error and "GiB per GPU at size 8" in host.error


FOUR_BIT = {  # the three community formats of V3.1 in 4 bits, as their tools write the config
    "awq group 64": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                     "modules_to_not_convert": None},
    "compressed-tensors, attention in bf16": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"]},
    "gptq group 128": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
}


def _v31_4bit(case: str, tmp_path: Path) -> Path:
    import json

    raw = json.loads(V31.read_text())
    raw["quantization_config"] = FOUR_BIT[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@needs_v31
@pytest.mark.parametrize("case", list(FOUR_BIT))
def test_4bit_v31_per_rank_bytes_equal_the_meta_model(case: str, tmp_path: Path) -> None:
    cfg = ModelConfig.from_file(_v31_4bit(case, tmp_path))
    assert cfg.int4 is not None and cfg.quant is None
    for rank in (0, 7):
        assert weight_bytes(cfg, 8, rank, fp8=False) == _meta_bytes(cfg, 8, rank, False), rank
    total = sum(weight_bytes(cfg, 1, 0, fp8=False).values())
    assert 330 * 10**9 < total < 400 * 10**9, total / 10**9  # ~360-380 GB: routed experts at ~a quarter of bf16


@needs_v31
def test_plan_cli_fits_4bit_v31_on_one_8x80gb_node(capsys, tmp_path: Path) -> None:
    path = _v31_4bit("awq group 64", tmp_path)
    assert main(["--model", str(path), "--tensor-parallel-size", "8", "--gpu-memory-gib", "79"]) == 0
    out = capsys.readouterr().out
    assert "4-bit awq" in out and "per 64 inputs" in out
    tokens = int(out.split("cache tokens that fit: ")[1].split()[0].replace(",", ""))
    assert tokens >= 4096, out
    assert main(["--model", str(V31), "--tensor-parallel-size", "8", "--gpu-memory-gib", "79"]) == 1  # FP8: no
    assert "does not fit" in capsys.readouterr().err
    gptq = _v31_4bit("gptq group 128", tmp_path)  # the dense layers' 18432 inputs over 32 ranks: 4.5 groups
    assert main(["--model", str(gptq), "--tensor-parallel-size", "32", "--gpu-memory-gib", "79"]) == 2
    assert "model.layers.0.mlp.down_proj: input size 18432 over 32 rank(s) gives slices of 576, which cut the " \
        "128-wide quantization groups" in capsys.readouterr().err
