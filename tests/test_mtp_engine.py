"""Speculative decoding with the model's own MTP layer in the engine step (issue 24; mtp_drafter.py): tokens equal
plain decoding's for K = 1..3, greedy and seeded, single and batched, with chunked prefill, preemption and prefix
hits; on a model the MTP layer predicts exactly (tests/mtp_checkpoints.py, `bigram=0`) every draft is accepted and
the target forwards fall to ceil(N / (K + 1)); each draft equals the one computed from scratch (the layer's latent
cache stays right through rollbacks); the pool is whole again afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import drive
from mtp_checkpoints import mtp_checkpoint

from deepseek_mcp.inference.engine.batch import ScheduledSeq, build_batch
from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.sequence import Sequence

pytest.importorskip("transformers")
N = 16  # tokens generated per request


def _engine(root: Path, bigram: float | None, k: int = 3) -> Engine:
    path, _, _ = mtp_checkpoint(root, False, seed=5, bigram=bigram)
    return Engine.from_pretrained(path, device="cpu", dtype="float32", speculative_tokens=k)


@pytest.fixture(scope="module")
def exact(tmp_path_factory) -> Engine:
    return _engine(tmp_path_factory.mktemp("bigram"), 0.0)


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> Engine:
    return _engine(tmp_path_factory.mktemp("partial"), 0.03)


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], k: int, *, cache_tokens: int = 1024,
         budget: int = 64, max_num_seqs: int | None = None, record: list | None = None
         ) -> tuple[list[Sequence], int, EngineCore]:
    """Every request through EngineCore; returns the sequences, the steps taken and the core. `record` gets
    (tokens, drafts) of every sequence after each step that left it drafts."""
    core = EngineCore(engine, max_num_seqs=max_num_seqs or len(prompts), max_num_batched_tokens=budget,
                      cache_tokens=cache_tokens, block_size=4, warm_up=False, speculative_tokens=k)
    seqs = [Sequence(str(i), p, sp, eos_id=engine.tokenizer.eos_id) for i, (p, sp) in enumerate(zip(prompts, params))]

    def note_drafts() -> None:
        if record is not None:
            record.extend((list(s.token_ids), list(s.draft_ids), _mtp_latents(core, s))
                          for s in core.scheduler.running if s.draft_ids)

    return seqs, drive(core, seqs, note_drafts), core


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_draft_accepted_where_the_layer_predicts_exactly(exact: Engine, k: int) -> None:
    prompts = _prompts(k, (6,))
    params = [SamplingParams(max_tokens=N, ignore_eos=True)]
    plain, plain_steps, _ = _run(exact, prompts, params, 0)
    spec, steps, core = _run(exact, prompts, params, k)
    assert spec[0].output_ids == plain[0].output_ids
    s = spec[0]
    assert s.num_drafted == s.num_accepted > 0  # the layer predicts the model's greedy token: all accepted
    # one prefill step, then each step emits 1 + K tokens (fewer where max_tokens leaves less room)
    assert plain_steps == N
    assert steps == 1 + -(-(N - 1) // (k + 1)), (steps, s.num_accepted)
    assert steps == plain_steps - s.num_accepted
    assert core.mtp is not None and core.mtp.forwards > 0
    core.block_manager.check(idle=True)
    assert core.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("k", [1, 3])
def test_batched_greedy_and_seeded_equal_plain_with_chunked_prefill(partial: Engine, k: int) -> None:
    prompts = _prompts(10 + k, (5, 23, 11, 40))
    params = [SamplingParams(max_tokens=N, ignore_eos=True),
              SamplingParams(max_tokens=N - 5, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7),
              SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.7, seed=3),
              SamplingParams(max_tokens=N - 2, ignore_eos=True)]
    plain, _, _ = _run(partial, prompts, params, 0, budget=24)  # a budget of 24: the prompts prefill in chunks
    spec, _, core = _run(partial, prompts, params, k, budget=24)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    drafted, accepted = sum(s.num_drafted for s in spec), sum(s.num_accepted for s in spec)
    assert 0 < accepted < drafted, (accepted, drafted)  # context matters here: some drafts miss, some hold
    core.block_manager.check(idle=True)
    assert core.block_manager.num_used_blocks == 0


def test_preemption_and_prefix_hits_change_no_token(partial: Engine) -> None:
    shared = _prompts(21, (24,))[0]
    prompts = [shared + p for p in _prompts(22, (3, 5, 4, 6))]
    params = [SamplingParams(max_tokens=N, ignore_eos=True)] * len(prompts)
    plain, _, _ = _run(partial, prompts, params, 0, cache_tokens=48, max_num_seqs=4)
    spec, _, core = _run(partial, prompts, params, 3, cache_tokens=48, max_num_seqs=4)  # 12 blocks for 4 x ~45
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert core.scheduler.num_preemptions > 0
    assert any(s.num_cached_tokens > 0 for s in spec)
    assert sum(s.num_accepted for s in spec) > 0
    core.block_manager.check(idle=True)
    assert core.block_manager.num_used_blocks == 0


def _mtp_latents(core: EngineCore, seq: Sequence) -> torch.Tensor:
    """The MTP layer's latents [P, C + R] in the pool for positions 0 .. P - 1 of a decoding sequence (P: its
    last token's position; the extend wrote those, the chained drafts the ones after)."""
    cache, bs = core.runner.kv_cache[-1], core.block_manager.block_size
    slots = [seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_tokens - 1)]
    return cache.view(-1, cache.shape[-1])[slots].clone()


def _scratch_drafts(engine: Engine, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor]:
    """The MTP layer's greedy drafts after `tokens`, computed from nothing: the main model over every token, the
    layer over every position, then chained (a fresh cache, no paging history); and the layer's latents of
    positions 0 .. P - 1 before the chained drafts."""
    model, cfg, bs = engine.model, engine.config, 4
    n_blocks = -(-(len(tokens) + k) // bs)
    cache = torch.full((cfg.num_layers + 1, n_blocks, bs, cfg.kv_cache_dim), float("nan"))  # poisoned
    table = list(range(n_blocks))
    dev = torch.device("cpu")
    x, pos, meta = build_batch([ScheduledSeq(tokens[:-1], 0, table)], bs, dev, all_logits=True)
    _, hidden = model(x, pos, meta, cache, return_hidden=True)  # states at 0 .. P - 1
    x, pos, meta = build_batch([ScheduledSeq(tokens[1:], 0, table)], bs, dev)
    logits, h = model.draft(x, pos, hidden, meta, cache)
    latents = cache[-1].view(-1, cache.shape[-1])[: len(tokens) - 1].clone()
    drafts = [int(logits[-1].argmax())]
    for j in range(1, k):
        x, pos, meta = build_batch([ScheduledSeq([drafts[-1]], len(tokens) + j - 2, table)], bs, dev)
        logits, h = model.draft(x, pos, h[-1:], meta, cache)
        drafts.append(int(logits[-1].argmax()))
    return drafts, latents


@pytest.mark.parametrize(("k", "lengths"), [(1, (9, 30)), (3, (9, 30)), (2, (30,))])
def test_each_draft_equals_the_layer_from_scratch(partial: Engine, k: int, lengths: tuple[int, ...]) -> None:
    """After verifies that accepted some drafts and rolled others back, and after chunked prefill (beside a
    decoding request, or alone: steps in which nothing drafts still write the layer's latents), the drafts the
    engine proposes, and the layer's latents they read, are those of the layer run over the whole sequence
    afresh."""
    record: list = []
    prompts = _prompts(30, lengths)
    params = [SamplingParams(max_tokens=N, ignore_eos=True)] * len(prompts)
    spec, _, _ = _run(partial, prompts, params, k, budget=16 if len(prompts) > 1 else 8, record=record)
    assert sum(s.num_accepted for s in spec) > 0 and len(record) > 5
    for tokens, drafts, latents in record:
        want, want_latents = _scratch_drafts(partial, tokens, k)
        assert drafts == want[: len(drafts)], (len(tokens), drafts, want)
        torch.testing.assert_close(latents, want_latents, rtol=1e-4, atol=1e-4)  # every position's, written once


def test_speculative_tokens_is_checked(tmp_path: Path, partial: Engine) -> None:
    with pytest.raises(ValueError, match="speculative_tokens must be 0"):
        Engine.from_pretrained(None, device="cpu", speculative_tokens=4)
    plain = Engine.from_pretrained(mtp_checkpoint(tmp_path, False, seed=1)[0], device="cpu", dtype="float32")
    assert plain.model.mtp is None and plain.speculative_tokens == 0
    with pytest.raises(ValueError, match="needs a drafter: load the model with its multi-token-prediction"):
        EngineCore(plain, max_num_seqs=1, cache_tokens=64, block_size=4, warm_up=False, speculative_tokens=1)
    assert EngineCore(partial, max_num_seqs=1, cache_tokens=64, block_size=4, warm_up=False).mtp is not None


def test_two_ranks_draft_and_verify_like_one_process(tmp_path: Path, partial: Engine) -> None:
    """Under tensor parallelism every rank runs the same MTP forwards (DRAFT) on its split of the layer: tokens,
    drafts and acceptances equal one process's."""
    path, _, _ = mtp_checkpoint(tmp_path, False, seed=5, bigram=0.03)  # the `partial` fixture's checkpoint
    prompts = _prompts(40, (7, 19))
    params = [SamplingParams(max_tokens=N, ignore_eos=True), SamplingParams(max_tokens=N, temperature=0.8, seed=2)]
    one, _, _ = _run(partial, prompts, params, 2, budget=16)
    with Engine.from_pretrained(path, device="cpu", dtype="float32", tensor_parallel_size=2,
                                speculative_tokens=2) as tp:
        two, _, core = _run(tp, prompts, params, 2, budget=16)
        core.block_manager.check(idle=True)
    assert [s.output_ids for s in two] == [s.output_ids for s in one]
    assert [(s.num_drafted, s.num_accepted) for s in two] == [(s.num_drafted, s.num_accepted) for s in one]
    assert sum(s.num_accepted for s in two) > 0


def test_bf16_verify_rows_compute_each_position_as_plain_decoding() -> None:
    """In bf16 a verify row's positions go through the decode path (one attention row per token), not the
    prefill's naive form, whose different rounding flipped near-tied greedy tokens of the demo's random model
    within 40 tokens (it fails so when step_inputs.py's decode view is removed)."""
    from deepseek_mcp.inference.engine.speculative import ReplayDrafter

    engine = Engine.from_pretrained(None, speculative_tokens=3)
    assert engine.dtype == torch.bfloat16
    prompts = [torch.randint(0, 120000, (n,), generator=torch.Generator().manual_seed(0)).tolist() for n in (9, 30)]
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    base = [o.token_ids for o in engine.generate(prompts, sp, speculative_tokens=0)]
    assert [o.token_ids for o in engine.generate(prompts, sp)] == base  # the engine's K = 3, MTP drafts
    replay = ReplayDrafter({str(i): b for i, b in enumerate(base)}, engine.config.vocab_size, 0.7)
    assert [o.token_ids for o in engine.generate(prompts, sp, drafter=replay, speculative_tokens=3)] == base


def test_verify_steps_replay_the_decode_graphs_with_hidden_states(partial: Engine) -> None:
    """The decode graphs (EagerGraph standing in for CUDA graphs on CPU) serve the verify steps: a step of B
    sequences verifying K drafts replays the bucket of B x (1 + K) rows and hands the MTP layer the hidden states
    the graph computed; the tokens and drafts equal the eager run's."""
    from deepseek_mcp.inference.engine.cuda_graphs import EagerGraph

    prompts = _prompts(50, (6, 11))
    params = [SamplingParams(max_tokens=N, ignore_eos=True)] * 2
    eager, _, _ = _run(partial, prompts, params, 2, budget=32)
    core = EngineCore(partial, max_num_seqs=2, max_num_batched_tokens=32, cache_tokens=1024, block_size=4,
                      warm_up=False, speculative_tokens=2)
    core.runner.warm_up(max_num_seqs=2 * 3, max_num_batched_tokens=32, max_context=64, force=True, graph=EagerGraph)
    graphs = core.runner.graphs
    assert graphs.hidden and graphs.buckets[-1] == 6
    replayed: list[int] = []
    run_hidden = graphs.run_hidden

    def counting(input_ids, positions, meta, b):
        replayed.append(meta.num_seqs)
        return run_hidden(input_ids, positions, meta, b)

    graphs.run_hidden = counting
    seqs = [Sequence(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    drive(core, seqs)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in eager]
    assert [(s.num_drafted, s.num_accepted) for s in seqs] == [(s.num_drafted, s.num_accepted) for s in eager]
    assert max(replayed) > 2  # steps with more rows than sequences: verify steps replayed


@pytest.mark.parametrize("fmt", ["compressed-tensors", "awq"])
def test_4bit_checkpoint_drafts_with_its_4bit_mtp_layer(tmp_path: Path, fmt: str) -> None:
    """A 4-bit checkpoint's MTP layer loads 4-bit (its Linears as the scheme quantizes them): its logits equal
    the fp32 dequantized checkpoint's, and speculative decoding changes no token."""
    from mtp_checkpoints import int4_mtp_checkpoint

    dirs = int4_mtp_checkpoint(tmp_path, fmt, 16, seed=5, bigram=0.03)
    q = Engine.from_pretrained(dirs["q"], device="cpu", dtype="float32", speculative_tokens=2)
    deq = Engine.from_pretrained(dirs["deq"], device="cpu", dtype="float32", speculative_tokens=2)
    assert q.model.mtp.eh_proj.int4_group and q.model.mtp.mlp.experts.int4_group  # the layer is 4-bit
    assert not deq.model.mtp.eh_proj.int4_group
    tokens = _prompts(60, (12,))[0]
    draft_q, draft_deq = (_scratch_logits(e, tokens) for e in (q, deq))
    torch.testing.assert_close(draft_q, draft_deq, rtol=1e-4, atol=1e-4 * draft_deq.abs().max().item())
    prompts = _prompts(61, (5, 14))
    params = [SamplingParams(max_tokens=N, ignore_eos=True)] * 2
    plain, _, _ = _run(q, prompts, params, 0)
    spec, _, core = _run(q, prompts, params, 2)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert sum(s.num_accepted for s in spec) > 0
    core.block_manager.check(idle=True)


def _scratch_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The MTP layer's logits [S - 1, V] over a whole sequence, from nothing (as `_scratch_drafts`)."""
    model, cfg, bs = engine.model, engine.config, 4
    n_blocks = -(-len(tokens) // bs)
    cache = torch.full((cfg.num_layers + 1, n_blocks, bs, cfg.kv_cache_dim), float("nan"))
    table = list(range(n_blocks))
    x, pos, meta = build_batch([ScheduledSeq(tokens, 0, table)], bs, torch.device("cpu"), all_logits=True)
    _, hidden = model(x, pos, meta, cache, return_hidden=True)
    x, pos, meta = build_batch([ScheduledSeq(tokens[1:], 0, table)], bs, torch.device("cpu"), all_logits=True)
    return model.draft(x, pos, hidden[:-1], meta, cache)[0]
