"""Item 6 and the CPU side of item 5 of issue 14: kernels warm at load (a request after "ready" compiles nothing),
the MLA split count bucketed, the decode CUDA-graph buckets and their padding (EagerGraph stands in for
torch.cuda.CUDAGraph; tests/test_cuda_graphs.py replays real graphs on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_checkpoints import tiny_hf_model  # noqa: E402

from deepseek_mcp.inference.engine.batch import ScheduledSeq  # noqa: E402
from deepseek_mcp.inference.engine.cuda_graphs import DecodeGraphs, EagerGraph  # noqa: E402
from deepseek_mcp.inference.engine.engine import Engine  # noqa: E402
from deepseek_mcp.inference.engine.warmup import bucket_for, decode_buckets, split_contexts, token_buckets, warm_steps  # noqa: E402
from deepseek_mcp.inference.model.attention import AttentionMetadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_buckets():
    assert decode_buckets(16) == (1, 2, 4, 8, 16)
    assert decode_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert decode_buckets(1) == (1,)
    assert decode_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert [bucket_for(b, (1, 2, 4, 8)) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert token_buckets(48) == (1, 2, 4, 8, 16, 32, 48) and len(token_buckets(512)) == 10
    with pytest.raises(ValueError, match="max_num_seqs"):
        decode_buckets(0)


def test_split_count_takes_seven_values():
    pytest.importorskip("triton")
    from deepseek_mcp.kernels.mla_triton import num_splits_for

    values = {num_splits_for(b, h, n, 132) for b in (1, 2, 3, 8, 64, 128) for h in (16, 128)
              for n in range(1, 163_841, 997)}
    assert values <= {1, 2, 4, 8, 16, 32, 64} and len(values) == 7
    contexts = split_contexts(1, 128, 163_840, 132)
    assert sorted({num_splits_for(1, 128, n, 132) for n in contexts}) == [1, 2, 4, 8, 16, 32, 64]
    steps = warm_steps(max_num_seqs=4, max_num_batched_tokens=8, max_context=4096, block_size=16, heads=128,
                       sms=132)
    labels = [label for label, _ in steps]
    assert labels[0] == "decode batch 1 context 4096" and "prefill 8 tokens" in labels and "mixed 4 tokens" in labels
    for label, seqs in steps:  # each step is valid for a pool of one block
        assert all(s.block_table and set(s.block_table) == {0} for s in seqs), label
        assert all(len(s.block_table) * 16 >= s.start_pos + len(s.token_ids) for s in seqs), label


class _Recorder:
    """A model that returns its inputs as logits, so the test sees exactly what a replay was given."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids, positions, meta: AttentionMetadata, cache) -> torch.Tensor:
        self.calls += 1
        cols = meta.block_tables[:, :3].to(torch.float32)  # [b, 3]
        return torch.cat((input_ids[:, None].float(), positions[:, None].float(), meta.slot_mapping[:, None].float(),
                          meta.seq_lens[:, None].float(), cols), dim=1)  # [b, 7]


def test_padding_repeats_row_zero_and_writes_nothing():
    model = _Recorder()
    cache = torch.zeros(8, 4, 2)
    graphs = DecodeGraphs(model, cache, 4, max_num_seqs=6, max_context=64, graph=EagerGraph)
    assert graphs.buckets == (1, 2, 4, 6)
    graphs.capture()
    assert model.calls == 2 * 4  # a warm run and the capture per bucket
    tables = torch.tensor([[3, 5, 0], [1, 2, 7], [6, 0, 0]], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([21, 7, 24]), block_tables=tables, seq_lens=torch.tensor([10, 8, 1]),
        query_start_loc=torch.arange(4), logits_indices=torch.arange(3), block_size=4, seq_lens_list=(10, 8, 1),
        query_lens_list=(1, 1, 1), max_seq_len=10)
    b = graphs.bucket(meta)
    assert b == 4
    out = graphs.run(torch.tensor([11, 12, 13]), torch.tensor([9, 7, 0]), meta, b)
    ref = torch.tensor([[11, 9, 21, 10, 3, 5, 0], [12, 7, 7, 8, 1, 2, 7], [13, 0, 24, 1, 6, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    padded = graphs.logits[4][3]  # the padding row: row 0's inputs, slot -1
    torch.testing.assert_close(padded, torch.tensor([11, 9, -1, 10, 3, 5, 0], dtype=torch.float32), rtol=0, atol=0)
    out.fill_(0)  # the returned logits are a copy, not the graph's buffer
    assert graphs.logits[4][0, 0] == 11
    prefill = AttentionMetadata(**{**meta.__dict__, "query_lens_list": (2, 1, 1)})
    assert graphs.bucket(prefill) is None  # a mixed step runs eagerly
    many = AttentionMetadata(**{**meta.__dict__, "seq_lens_list": (1,) * 7, "query_lens_list": (1,) * 7})
    assert graphs.bucket(many) is None  # past the largest bucket: eager


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("warm") / "m"
    tiny_hf_model(path, hidden=32, vocab_size=64)
    return Engine.from_pretrained(path, device=DEVICE, dtype="float32", kernels="triton")


def _requests(runner) -> list[torch.Tensor]:
    """Served shapes: two prefills (3 and 5 tokens), a mixed step, decodes at batch 3, 2, 1 -> logits."""
    t = [[0, 1], [2, 3], [4, 5]]
    out = [runner.run([ScheduledSeq([5, 6, 7], 0, t[0]), ScheduledSeq([1, 2, 3, 4, 9], 0, t[1])])]
    out.append(runner.run([ScheduledSeq([8], 3, t[0]), ScheduledSeq([3, 3], 0, t[2])]))
    out.append(runner.run([ScheduledSeq([1], 4, t[0]), ScheduledSeq([2], 5, t[1]), ScheduledSeq([4], 2, t[2])]))
    out.append(runner.run([ScheduledSeq([6], 5, t[0]), ScheduledSeq([7], 3, t[2])]))
    out.append(runner.run([ScheduledSeq([3], 6, t[1])]))
    return out


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_after_warm_up_a_request_compiles_nothing(tiny, enforce_eager):
    from compile_hook import record_compiles

    limits = dict(max_num_seqs=3, max_num_batched_tokens=8, max_context=32)
    cold = tiny.make_runner(8, 4)
    with record_compiles() as before:
        cold.run([ScheduledSeq([5, 6, 7], 0, [0])])
    assert before, "the recorder sees launches"
    runner = tiny.make_runner(8, 4)
    lines: list[str] = []
    with record_compiles() as warm:
        runner.warm_up(**limits, force=True, log=lines.append, graph=EagerGraph, enforce_eager=enforce_eager)
    assert lines[0].startswith("warming kernels 1/")
    if enforce_eager:  # decode warmed per batch bucket, nothing captured
        assert runner.graphs is None and any("decode batch 3" in line for line in lines)
    else:  # decode warmed by the capture
        assert lines[-1].startswith("capturing CUDA graph: decode batch 1") and runner.graphs.buckets == (1, 2, 3)
    runner.kv_cache.zero_()
    with record_compiles() as served:
        logits = _requests(runner)
    new = set(served) - set(warm)
    assert not new, f"compiled after warm-up: {sorted(new)[:3]}"
    eager = tiny.make_runner(8, 4)  # the same requests without graphs: the replays gave the same logits
    for got, ref in zip(logits, _requests(eager)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_warm_up_is_a_no_op_on_cpu_by_default(tiny):
    runner = tiny.make_runner(8, 4)
    lines: list[str] = []
    runner.warm_up(max_num_seqs=2, max_num_batched_tokens=8, max_context=32, log=lines.append)
    assert lines == [] and runner.graphs is None or DEVICE == "cuda"


def test_rope_kv_cache_skips_padding_slots():
    pytest.importorskip("triton")
    from deepseek_mcp.kernels.rope import rope_kv_cache, rope_kv_cache_torch

    g = torch.Generator().manual_seed(3)
    t, h, c, r = 3, 2, 16, 8
    kv, q_pe = torch.randn(t, c + r, generator=g), torch.randn(t, h, r, generator=g)
    weight, ang = torch.randn(c, generator=g), torch.rand(t, r // 2, generator=g)
    cache = torch.full((6, c + r), 7.0)
    ref = cache.clone()
    rope_kv_cache_torch(kv[1:], weight, q_pe[1:], ang.cos()[1:], ang.sin()[1:], torch.tensor([4, 0]), ref, 1e-6)
    q = rope_kv_cache(kv, weight, q_pe, ang.cos(), ang.sin(), torch.tensor([-1, 4, 0]), cache, 1e-6)
    torch.testing.assert_close(cache, ref)  # row 0 (slot -1) wrote nothing
    assert q.shape == (t, h, r) and torch.isfinite(q).all()


class _WarmRunner:
    num_blocks = 4

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def warm_up(self, **kwargs) -> None:
        self.calls.append(kwargs)


def test_engine_core_warms_its_runner_with_the_pool_limits():
    from types import SimpleNamespace

    from deepseek_mcp.inference.engine.core import EngineCore

    engine = SimpleNamespace(max_context=96, device="cpu")
    runner = _WarmRunner()
    EngineCore(engine, max_num_seqs=3, max_num_batched_tokens=40, runner=runner, enforce_eager=True)
    assert runner.calls == [dict(max_num_seqs=3, max_num_batched_tokens=40, max_context=96, enforce_eager=True,
                                 force=None)]
    EngineCore(engine, runner=runner, warm_up=False)
    assert len(runner.calls) == 1


def test_enforce_eager_flags():
    from deepseek_mcp.inference.__main__ import build_parser
    from deepseek_mcp.mcp_server.__main__ import build_parser as server_parser
    from deepseek_mcp.mcp_server.__main__ import overrides

    assert build_parser().parse_args(["generate", "--prompt", "x", "--enforce-eager"]).enforce_eager
    assert not build_parser().parse_args(["generate", "--prompt", "x"]).enforce_eager
    assert overrides(server_parser().parse_args(["--enforce-eager"]))["enforce_eager"] is True
    assert "enforce_eager" not in overrides(server_parser().parse_args([]))


def test_triton_cache_under_the_project_cache(tmp_path, monkeypatch):
    from deepseek_mcp.kernels.platform import use_user_cache

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert use_user_cache(tmp_path) == tmp_path / "triton"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")  # the user's setting wins
    assert str(use_user_cache(tmp_path)) == "/elsewhere"
    pytest.importorskip("triton")
    import triton

    from deepseek_mcp.kernels.tuning import _persists

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 2):
        assert _persists()  # autotune results go to the same cache dir (off under the interpreter, which tunes nothing)
