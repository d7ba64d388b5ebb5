"""Decode CUDA graphs on a GPU (issue 14, item 5): captured per batch bucket after the warm-up, replay equals
the eager step for every bucket and the batch sizes between them; padding rows write nothing into the cache;
after "ready" nothing compiles; `enforce_eager` captures nothing. Skipped without CUDA (the staging and padding
logic is tested on CPU in tests/test_warmup.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

MAX_SEQS = 128
BLOCK = 16
LIMITS = dict(max_num_seqs=MAX_SEQS, max_num_batched_tokens=64, max_context=512)


@pytest.fixture(scope="module", params=["fp8", "float32"])
def engine(request, tmp_path_factory):
    pytest.importorskip("triton")
    from hf_checkpoints import fp8_checkpoint_pair, tiny_hf_model

    from deepseek_mcp.inference.engine.engine import Engine

    root = tmp_path_factory.mktemp("graphs")
    if request.param == "fp8":
        ck = fp8_checkpoint_pair(root, hidden=128, q_lora_rank=128, moe_intermediate_size=128, top_k=2,
                                 n_group=2, topk_group=1)
        return Engine.from_pretrained(ck["fp8"], device="cuda", dtype="bfloat16", kernels="triton")
    tiny_hf_model(root / "m", hidden=64)
    return Engine.from_pretrained(root / "m", device="cuda", dtype="float32", kernels="triton")


def _prefill(runner, batch: int, tables: list[list[int]]) -> None:
    from deepseek_mcp.inference.engine.batch import ScheduledSeq

    runner.run([ScheduledSeq([(7 * i + j) % 50 for j in range(5 + i % 7)], 0, tables[i]) for i in range(batch)])


def _decode(runner, batch: int, tables: list[list[int]], step: int) -> torch.Tensor:
    from deepseek_mcp.inference.engine.batch import ScheduledSeq

    return runner.run([ScheduledSeq([(3 * i + step) % 50], 5 + i % 7 + step, tables[i]) for i in range(batch)])


@pytest.fixture(scope="module")
def runners(engine):
    graphed = engine.make_runner(4 * MAX_SEQS, BLOCK)
    lines: list[str] = []
    graphed.warm_up(**LIMITS, log=lines.append)
    assert graphed.graphs is not None and graphed.graphs.buckets == (1, 2, 4, 8, 16, 32, 64, 128)
    assert any(line.startswith("capturing CUDA graph: decode batch 128") for line in lines)
    eager = engine.make_runner(4 * MAX_SEQS, BLOCK)
    eager.warm_up(**LIMITS, enforce_eager=True)
    assert eager.graphs is None
    return graphed, eager


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 8, 16, 17, 32, 64, 100, 128])
def test_replay_equals_eager(runners, batch):
    graphed, eager = runners
    tables = [[4 * i, 4 * i + 1] for i in range(batch)]
    with torch.inference_mode():
        for r in (graphed, eager):
            r.kv_cache.zero_()
            _prefill(r, batch, tables)
        for step in range(3):  # a few steps: each one's cache write is read by the next
            got, ref = _decode(graphed, batch, tables, step), _decode(eager, batch, tables, step)
            assert got.shape == ref.shape == (batch, ref.shape[1])
            torch.testing.assert_close(got, ref, rtol=2e-2 if ref.dtype != torch.float32 else 1e-4, atol=1e-3)
        torch.cuda.synchronize()
        torch.testing.assert_close(graphed.kv_cache, eager.kv_cache, rtol=2e-2, atol=1e-3)  # padding wrote nothing


def test_nothing_compiles_after_ready(runners):
    from compile_hook import record_compiles

    graphed, _ = runners
    tables = [[4 * i, 4 * i + 1] for i in range(5)]
    with torch.inference_mode(), record_compiles() as compiled:
        _prefill(graphed, 5, tables)
        for step in range(2):
            _decode(graphed, 5, tables, step)
        _decode(graphed, 3, tables, 2)
        torch.cuda.synchronize()
    assert compiled == [], compiled[:3]
