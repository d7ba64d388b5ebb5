"""The project's layout promises: one generation loop (the sync `Engine.generate` drives the same `EngineCore`
step as the server's `AsyncEngine`) and no source file past the size we keep them under. What the install
promises (one top-level name, imports from anywhere) is tested in test_packaging.py."""

from __future__ import annotations

import ast
from pathlib import Path

import anyio
import pytest
import torch
from hf_checkpoints import tiny_hf_model

from deepseek_mcp.inference.engine.async_engine import AsyncEngine
from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("tiny_layout")
    tiny_hf_model(path, seed=5)
    return Engine.from_pretrained(path, device="cpu", dtype="float32")


def test_generate_runs_through_engine_core_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    real = EngineCore.step

    def counted(self: EngineCore):
        result = real(self)
        steps.append(len(result.out.seqs) if result.out is not None else 0)
        return result

    monkeypatch.setattr(EngineCore, "step", counted)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 17, 9)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    # one step prefills every prompt and samples each one's first token, then one decode step per token
    assert steps == [3] * 6
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    assert [o.prompt_tokens for o in outs] == [5, 17, 9]


def test_generate_equals_the_async_engine(engine: Engine) -> None:
    seed = int(torch.randint(0, 2**31, ()).item())
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (3, 30, 12, 1)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=1.0, seed=seed),
              SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=seed + 1),
              SamplingParams(max_tokens=5, stop_token_ids=[int(prompts[0][0])])]
    sync = engine.generate(prompts, params)

    async def run() -> list[list[int]]:
        async with AsyncEngine(engine, max_num_seqs=4, cache_tokens=512, block_size=4) as aeng:
            results: list[list[int]] = [[] for _ in prompts]

            async def one(i: int) -> None:
                async for out in aeng.stream(prompts[i], params[i]):
                    results[i] = out.token_ids
            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
            return results

    assert anyio.run(run) == [o.token_ids for o in sync], f"seed={seed}"


def test_no_source_file_over_450_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for folder in ("inference", "kernels", "mcp_server")
            for p in (ROOT / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these files: {long}"


# Who may import whom: each folder only from the layers below it (`mcp_server` -> `inference.engine` ->
# `inference.model` / `.text` / `.constrained` -> `inference.resources`, `kernels`).
LAYERS = {
    "kernels": ("deepseek_mcp.kernels",),
    "inference/resources.py": (),
    "inference/model": ("deepseek_mcp.inference.model", "deepseek_mcp.inference.resources", "deepseek_mcp.kernels"),
    "inference/text": ("deepseek_mcp.inference.text",),
    "inference/constrained": ("deepseek_mcp.inference.constrained", "deepseek_mcp.inference.text"),
    "inference/engine": ("deepseek_mcp.inference", "deepseek_mcp.kernels"),
}


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {n for n in names if n.startswith("deepseek_mcp.")}


def test_no_layer_imports_upward() -> None:
    upward = {}
    for where, allowed in LAYERS.items():
        files = [ROOT / where] if where.endswith(".py") else (ROOT / where).rglob("*.py")
        for path in files:
            bad = sorted(n for n in _project_imports(path) if not n.startswith(allowed))
            if bad:
                upward[str(path.relative_to(ROOT))] = bad
    assert not upward, f"imports from a layer above: {upward}"
