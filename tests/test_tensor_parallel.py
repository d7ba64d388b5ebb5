"""Tensor and expert parallelism on CPU with gloo: N ranks (this process is rank 0, the others child processes)
must give the single-process logits (fp32, within 1e-5 of the largest logit) and the same greedy tokens, through
`Engine.generate` and the async engine (continuous batching, chunked prefill, prefix cache); a killed worker must
fail the request with an error naming its rank; no worker process may outlive its engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
import torch
from hf_checkpoints import fp8_checkpoint_pair, tiny_hf_model

from deepseek_mcp.inference.engine.async_engine import AsyncEngine
from deepseek_mcp.inference.engine.distributed import WorkerFailure
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.model.parallel import ParallelConfigError

pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


def _prompt(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _worker_pids(engine: Engine) -> list[int]:
    return [p.pid for p in engine.ranks[0].procs.values()]


def _assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "worker processes outlived their engine"


def _assert_logits_match(ref: Engine, tp: Engine, ids: list[int]) -> None:
    want, got = ref.logits(ids), tp.logits(ids)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"max abs error {err} vs largest logit {want.abs().max()}"


@pytest.mark.slow
def test_demo_matches_one_process() -> None:
    """One engine per process at a time (torch.distributed's default group), so one test for the demo."""
    ref = Engine.from_pretrained(None, device="cpu", dtype="float32")
    with Engine.from_pretrained(None, device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=60) as tp:
        pids = _worker_pids(tp)
        with pytest.raises(ValueError, match="already running in this process"):
            Engine.from_pretrained(None, device="cpu", dtype="float32", tensor_parallel_size=2)
        _check_demo_greedy(ref, tp)
        _check_demo_async_batch(ref, tp)
    _assert_gone(pids)


def _check_demo_greedy(ref: Engine, tp: Engine) -> None:
    assert tp.tensor_parallel_size == 2 and tp.failure is None
    assert tp.num_parameters == ref.num_parameters  # the whole model's count, not rank 0's part
    _assert_logits_match(ref, tp, _prompt(40, 1, 129280))
    prompts = [_prompt(n, seed, 129280) for n, seed in ((5, 2), (17, 3), (33, 4))]
    want = [o.token_ids for o in ref.generate(prompts, GREEDY)]
    assert [o.token_ids for o in tp.generate(prompts, GREEDY)] == want
    assert all(len(t) == 32 for t in want)


def _check_demo_async_batch(ref: Engine, tp: Engine) -> None:
    """Unequal lengths, a token budget that chunks the prefills, small blocks, then prefix-cache hits."""
    shared = _prompt(21, 5, 129280)
    prompts = [_prompt(n, 10 + n, 129280) for n in (3, 9, 30, 14)]
    prompts += [shared + p[:3] for p in prompts]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (6, 9, 4, 7, 5, 8, 6, 3)]
    want = [ref.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    async def main() -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}
        async with AsyncEngine(tp, max_num_seqs=4, max_num_batched_tokens=16, cache_tokens=1024,
                               block_size=4) as aeng:

            async def one(i: int) -> None:
                outs = [o async for o in aeng.stream(prompts[i], params[i])]
                got[i] = outs[-1].token_ids

            for batch in (range(4), range(4, 8)):  # the second batch reuses the first's shared prefix
                async with anyio.create_task_group() as tg:
                    for i in batch:
                        tg.start_soon(one, i)
            assert aeng.stats().prefix_hit_tokens > 0
        return got

    got = anyio.run(main)
    assert [got[i] for i in range(len(prompts))] == want


HF_CASES = {
    "q_lora+yarn+groups, vocab 250 (padded), N=2": (dict(q_lora_rank=48, yarn=True, n_group=2, topk_group=1,
                                                        vocab_size=250), 2),
    "no q_lora, yarn, 4 groups, N=4 (one head per rank)": (dict(q_lora_rank=None, yarn=True, n_group=4,
                                                                 topk_group=2), 4),
    "no rope scaling, N=2": (dict(q_lora_rank=48, yarn=False, n_group=1, topk_group=1), 2),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if HF_CASES[c][1] > 2 else c
                                  for c in HF_CASES])
def test_transformers_checkpoints_match_one_process(case: str, tmp_path: Path) -> None:
    kw, n = HF_CASES[case]
    tiny_hf_model(tmp_path, seed=3, **kw)
    ref = Engine.from_pretrained(tmp_path, device="cpu", dtype="float32")
    vocab = kw.get("vocab_size", 256)
    prompts = [_prompt(k, seed, vocab) for k, seed in ((7, 1), (26, 2))]
    want = [o.token_ids for o in ref.generate(prompts, GREEDY)]
    with Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=n,
                                dist_timeout_s=60) as tp:
        pids = _worker_pids(tp)
        assert len(pids) == n - 1
        _assert_logits_match(ref, tp, _prompt(40, 9, vocab))
        assert [o.token_ids for o in tp.generate(prompts, GREEDY)] == want
    _assert_gone(pids)


def test_bf16_ranks_with_packed_cpu_weights_match(tmp_path: Path) -> None:
    """bf16 on the CPU: every rank's column- and row-parallel projections and its vocabulary slice of the head run
    oneDNN-packed (inference/model/onednn.py). bf16 rounds differently per split (partial sums added after
    rounding), so the logits within bf16 tolerance (3% of the largest) of one process."""
    from deepseek_mcp.inference.model import onednn
    from deepseek_mcp.inference.model.layers import Linear

    if not onednn.probe(torch.bfloat16):
        pytest.skip("this torch build cannot run oneDNN's packed bf16 linear")
    tiny_hf_model(tmp_path, seed=3, hidden=128)
    ref = Engine.from_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    assert all(m.packed for m in ref.model.modules() if isinstance(m, Linear))
    ids = _prompt(40, 9)
    with Engine.from_pretrained(tmp_path, device="cpu", dtype="bfloat16", tensor_parallel_size=2,
                                dist_timeout_s=60) as tp:
        assert all(m.packed for m in tp.model.modules() if isinstance(m, Linear))  # rank 0's shards
        want, got = ref.logits(ids), tp.logits(ids)
        assert (got - want).abs().max().item() <= 0.03 * want.abs().max().item()


def test_fp8_checkpoint_with_cut_scale_blocks_matches(tmp_path: Path) -> None:
    """hidden 192 and 4 heads: q_b/kv_b/o splits land inside 128x128 scale blocks; handled exactly at load."""
    dirs = fp8_checkpoint_pair(tmp_path, hidden=192)
    ref = Engine.from_pretrained(dirs["fp8"], device="cpu", dtype="float32")
    with Engine.from_pretrained(dirs["fp8"], device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=60) as tp:
        _assert_logits_match(ref, tp, _prompt(33, 4))


@pytest.mark.slow
def test_triton_kernels_on_local_heads_and_experts_match_one_process(tmp_path: Path) -> None:
    """The Triton path (interpreter on CPU): mla_prefill/mla_decode on the local heads, the grouped MoE GEMM on the
    local experts, every token routed to every expert (continuous comparison), fp32 weights."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    path = fp8_checkpoint_pair(tmp_path, top_k=8, n_group=1, topk_group=1)["deq"]
    ids = _prompt(21, 4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ref = Engine.from_pretrained(path, device="cpu", dtype="float32", kernels="triton")
    want_logits, want = ref.logits(ids, block_size=8), ref.generate([ids[:9], ids[:2]], params, block_size=4)
    with Engine.from_pretrained(path, device="cpu", dtype="float32", kernels="triton", tensor_parallel_size=2,
                                dist_timeout_s=120) as tp:
        assert tp.kernels == "triton"
        got = tp.logits(ids, block_size=8)
        assert (got - want_logits).abs().max() <= 1e-5 * want_logits.abs().max()
        got_ids = [o.token_ids for o in tp.generate([ids[:9], ids[:2]], params, block_size=4)]
        assert got_ids == [o.token_ids for o in want]


def test_expert_slices_of_two_ranks_sum_to_the_whole_layer_without_host_sync() -> None:
    """Each of 2 ranks holds every expert's half of the intermediate size and the shared expert's half, stacked
    as expert E on the Triton path (interpreter on CPU) exactly as on one device: the two ranks' partial outputs
    (what the all-reduce sums) equal the one-device MoE's output, the Triton path runs under the sync guard, and
    each rank's Triton output equals its torch path."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    from dataclasses import replace

    from helpers import assert_close, local_tp
    from sync_guard import NoHostSync

    from deepseek_mcp.inference.model.config import ModelConfig
    from deepseek_mcp.inference.model.demo import DEMO_CONFIG
    from deepseek_mcp.inference.model.layers import Runtime
    from deepseek_mcp.inference.model.moe import MoE
    from deepseek_mcp.inference.model.parallel import TPContext

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(ModelConfig.from_dict(DEMO_CONFIG), n_routed_experts=8, hidden_size=32, moe_intermediate_size=16,
                  n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=3)
    g = torch.Generator().manual_seed(5)
    whole = {}  # checkpoint-shaped tensors, one device
    for name in ("gate_proj", "up_proj"):
        whole[f"experts.{name}"] = torch.randn(8, 16, 32, generator=g) * 0.3
        whole[f"shared.{name}"] = torch.randn(16, 32, generator=g) * 0.3
    whole["experts.down_proj"] = torch.randn(8, 32, 16, generator=g) * 0.3
    whole["shared.down_proj"] = torch.randn(32, 16, generator=g) * 0.3
    gate_w, bias = torch.randn(8, 32, generator=g), torch.randn(8, generator=g) * 0.1

    def build(kernels: str, tp: TPContext) -> MoE:
        moe = MoE(cfg, Runtime(dtype=torch.float32, kernels=kernels), False, dev, tp)
        i = 16 // tp.world_size
        rows = slice(tp.rank * i, (tp.rank + 1) * i)
        with torch.no_grad():
            moe.gate.weight.copy_(gate_w)
            moe.gate.e_score_correction_bias.copy_(bias)
            for name in ("gate_proj", "up_proj"):
                getattr(moe.experts, name).copy_(whole[f"experts.{name}"][:, rows])
                getattr(moe.shared_experts, name).weight.copy_(whole[f"shared.{name}"][rows])
            moe.experts.down_proj.copy_(whole["experts.down_proj"][:, :, rows])
            moe.shared_experts.down_proj.weight.copy_(whole["shared.down_proj"][:, rows])
        moe.gate.prepare_()
        moe.shared_experts.fuse_gate_up_()
        if kernels == "triton":
            moe.experts.fuse_gate_up_()
            moe.fuse_shared_expert_()
            assert moe.shared_experts is None and moe.experts.gate_up_proj.shape == (9, 2 * i, 32)
        return moe

    x = torch.randn(6, 32, generator=g).to(dev)
    with torch.inference_mode():
        want = build("torch", TPContext(0, 1))(x)
        parts = []
        for rank in range(2):
            tp = local_tp(rank, 2)  # the all-reduce leaves this rank's partial sum
            with NoHostSync():
                parts.append(build("triton", tp)(x))
            assert_close(parts[-1], build("torch", tp)(x), rtol=1e-5, what=f"rank {rank} triton vs torch")
            assert tp.calls == ["all_reduce"] * 2  # one per layer forward: the layer's only collective
    assert_close(parts[0] + parts[1], want, rtol=1e-5, what="rank 0 + rank 1 vs one device")


def test_sizes_that_do_not_split_are_refused_before_any_start(tmp_path: Path) -> None:
    tiny_hf_model(tmp_path, seed=1)  # 4 heads, 8 experts, intermediate 96, shared 32
    before = _children()
    with pytest.raises(ParallelConfigError, match=r"tensor-parallel size 3 does not divide "
                                                  r"num_attention_heads = 4.*moe_intermediate_size = 32"):
        Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=3)
    assert _children() == before


def _children() -> set[int]:
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(") ", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(d.name))
    return out


class _KillAt:
    """A logits processor that SIGKILLs a worker when its request has `n` tokens: death mid-generation."""

    def __init__(self, pid: int, n: int):
        self.pid, self.n = pid, n

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) == self.n:
            os.kill(self.pid, signal.SIGKILL)
        return logits


def test_killed_worker_fails_requests_naming_its_rank(tmp_path: Path) -> None:
    tiny_hf_model(tmp_path, seed=2)
    tp = Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=20)
    (pid,) = _worker_pids(tp)
    errors: list[BaseException] = []

    async def main() -> None:
        async with AsyncEngine(tp, max_num_seqs=2, cache_tokens=512, block_size=4) as aeng:
            t0 = time.monotonic()
            with pytest.raises(WorkerFailure) as first:
                async for _ in aeng.stream(_prompt(5, 1), SamplingParams(max_tokens=100, ignore_eos=True),
                                           logits_processors=[_KillAt(pid, 5)]):
                    pass
            assert time.monotonic() - t0 < 20
            errors.append(first.value)
            with pytest.raises(WorkerFailure) as later:  # every later call: the same error, at once
                async for _ in aeng.stream(_prompt(3, 2), SamplingParams(max_tokens=4)):
                    pass
            errors.append(later.value)

    try:
        anyio.run(main)
        for e in errors:
            assert "tensor-parallel rank 1" in str(e) and "exited with code -9" in str(e), str(e)
        assert tp.failure is not None and "rank 1" in tp.failure
    finally:
        tp.close()
    _assert_gone([pid])


@pytest.mark.slow
def test_hung_worker_times_out_naming_its_rank(tmp_path: Path) -> None:
    """A worker stopped with SIGSTOP: the step's collective times out and the error names the silent rank."""
    tiny_hf_model(tmp_path, seed=5)
    with Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=4) as tp:
        (pid,) = _worker_pids(tp)
        tp.generate([_prompt(4, 1)], SamplingParams(max_tokens=2))
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3)  # heartbeats go stale
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"tensor-parallel rank 1 stopped responding"):
            tp.generate([_prompt(4, 2)], SamplingParams(max_tokens=2))
        assert time.monotonic() - t0 < 4 + 5
        with pytest.raises(WorkerFailure, match="rank 1"):
            tp.logits([1, 2, 3])
    _assert_gone([pid])


@pytest.mark.slow
def test_torchrun_ranks_generate_like_one_process(capsys, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m deepseek_mcp.inference generate`: rank 0 generates, rank 1 runs the model
    loop."""
    from deepseek_mcp.inference.__main__ import main

    args = ["generate", "--prompt", "hello", "--max-tokens", "8", "--dtype", "float32", "--device", "cpu"]
    assert main(args) == 0
    want = capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "deepseek_mcp.inference", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == want and "x2 ranks" in out.stderr


def test_workers_never_outlive_rank_0(tmp_path: Path) -> None:
    """Rank 0 killed with SIGKILL (no cleanup runs): its workers exit on their own."""
    tiny_hf_model(tmp_path, seed=4)
    script = textwrap.dedent(f"""
        import sys, time
        from deepseek_mcp.inference.engine.engine import Engine
        e = Engine.from_pretrained({str(tmp_path)!r}, device="cpu", dtype="float32", tensor_parallel_size=2)
        print(*[p.pid for p in e.ranks[0].procs.values()], flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 1 and _alive(pids[0])
    finally:
        proc.kill()
        proc.wait()
    _assert_gone(pids, within_s=10)


def test_worker_that_cannot_start_is_named_at_once(tmp_path: Path, monkeypatch) -> None:
    """A worker that dies before joining (here: a broken spec) fails the start naming it, without waiting out
    the start timeout, and leaves nothing running."""
    from deepseek_mcp.inference.engine import launch

    tiny_hf_model(tmp_path, seed=6)
    monkeypatch.setattr(launch, "asdict", lambda spec: {"no_such_field": 1})
    before = _children()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code 1 while starting"):
        Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=2)
    assert time.monotonic() - t0 < 60
    assert _children() == before
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.slow
def test_workers_wait_for_a_slow_rank_0_without_timing_out(tmp_path: Path, monkeypatch) -> None:
    """Rank 0 loading slower than the collective timeout: the workers, ready first, must still be there."""
    from deepseek_mcp.inference.engine import launch

    tiny_hf_model(tmp_path, seed=7)
    build = launch.build_rank_model

    def slow_build(spec, group):
        model = build(spec, group)
        if group.tp.rank == 0:
            time.sleep(5)  # > dist_timeout_s: a worker already in the command loop would time out
        return model

    monkeypatch.setattr(launch, "build_rank_model", slow_build)
    with Engine.from_pretrained(tmp_path, device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=2) as tp:
        time.sleep(1)
        assert tp.failure is None
        assert len(tp.generate([_prompt(5, 1)], GREEDY)[0].token_ids) == 32


@pytest.mark.slow
def test_warm_up_and_decode_graphs_run_on_every_rank(tmp_path: Path) -> None:
    """Warm-up under tensor parallelism: every rank warms the same step shapes and captures the same decode graphs
    at once (their collectives line up), reports its graph count, and a decode step replays on every rank,
    giving the logits of one process without graphs. EagerGraph stands in for CUDA graphs (Triton interpreter)."""
    pytest.importorskip("triton")
    from deepseek_mcp.inference.engine.batch import ScheduledSeq
    from deepseek_mcp.inference.engine.cuda_graphs import EagerGraph

    path = tmp_path / "m"
    tiny_hf_model(path, hidden=32, vocab_size=64)
    ref = Engine.from_pretrained(path, device="cpu", dtype="float32", kernels="triton")
    tables = [[0, 1], [2, 3]]

    def served(runner) -> list[torch.Tensor]:  # a prefill of two sequences, a decode of both, a decode of one
        out = [runner.run([ScheduledSeq([5, 6, 7], 0, tables[0]), ScheduledSeq([1, 2, 3, 4, 9], 0, tables[1])])]
        out.append(runner.run([ScheduledSeq([8], 3, tables[0]), ScheduledSeq([3], 5, tables[1])]))
        out.append(runner.run([ScheduledSeq([2], 6, tables[1])]))
        return out

    want = served(ref.make_runner(8, 4))
    with Engine.from_pretrained(path, device="cpu", dtype="float32", kernels="triton", tensor_parallel_size=2,
                                dist_timeout_s=120) as tp:
        runner = tp.make_runner(8, 4)
        runner.warm_up(max_num_seqs=2, max_num_batched_tokens=4, max_context=16, log=[].append)  # CPU: no-op
        assert runner.graphs_per_rank is None and runner.graphs is None
        with pytest.raises(ValueError, match="EagerGraph"):
            runner.warm_up(max_num_seqs=2, max_num_batched_tokens=4, max_context=16, force=True, graph=object)
        lines: list[str] = []
        runner.warm_up(max_num_seqs=2, max_num_batched_tokens=4, max_context=16, force=True, log=lines.append,
                       graph=EagerGraph)
        assert runner.graphs_per_rank == [2, 2]  # buckets 1 and 2 on both ranks
        assert lines[0].startswith("warming kernels 1/") and lines[-1] == "capturing CUDA graph: decode batch 1"
        runner.local.kv_cache.zero_()  # (the workers' pools hold the warm-up's writes to block 0: never read)
        for got, expect in zip(served(runner), want):
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        assert [o.token_ids for o in tp.generate([[3, 4, 5]], GREEDY)] == \
            [o.token_ids for o in ref.generate([[3, 4, 5]], GREEDY)]  # the engine serves on after warm-up
