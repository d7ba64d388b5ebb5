"""Speculative decoding's verify path (issue 24) with a replay drafter (drafts from a previous plain run, wrong
at chosen positions): the tokens equal plain decoding's for greedy, seeded sampled and processed requests, with
stop tokens, K = 1..3 and acceptance 0 to 1; the decode steps fall by exactly the accepted drafts; the cache pool
is whole again afterwards."""

from __future__ import annotations

import pytest
import torch
from helpers import drive
from hf_checkpoints import tiny_hf_model

from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.sequence import Sequence
from deepseek_mcp.inference.engine.speculative import ReplayDrafter, emitted_tokens

pytest.importorskip("transformers")
N = 20  # tokens generated per request


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("spec")
    tiny_hf_model(path, seed=11)
    return Engine.from_pretrained(path, device="cpu", dtype="float32")


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], drafter=None, k: int = 0,
         processors=None) -> tuple[list[Sequence], int, EngineCore]:
    """Every request through EngineCore (as Engine.generate); returns the sequences, the steps taken, the core."""
    core = EngineCore(engine, max_num_seqs=len(prompts), max_num_batched_tokens=64, cache_tokens=512, block_size=4,
                      warm_up=False, drafter=drafter, speculative_tokens=k)
    seqs = [Sequence(str(i), p, sp, logits_processors=tuple(processors[i]) if processors else (),
                     eos_id=engine.tokenizer.eos_id) for i, (p, sp) in enumerate(zip(prompts, params))]
    return seqs, drive(core, seqs), core


def test_emitted_tokens_rule() -> None:
    assert emitted_tokens([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus the bonus token
    assert emitted_tokens([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the first mismatch: the target's token, then stop
    assert emitted_tokens([5], [4, 1]) == [4]
    assert emitted_tokens([], [3]) == [3]
    with pytest.raises(ValueError, match="one more"):
        emitted_tokens([1, 2], [1, 2])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("acceptance", [1.0, 0.5, 0.0])
def test_greedy_and_seeded_tokens_equal_plain_decoding(engine: Engine, k: int, acceptance: float) -> None:
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 13, 9)]
    params = [SamplingParams(max_tokens=N, ignore_eos=True),
              SamplingParams(max_tokens=N, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7),
              SamplingParams(max_tokens=N - 3, ignore_eos=True, temperature=0.7, seed=3)]
    plain, _, _ = _run(engine, prompts, params)
    want = {s.request_id: s.output_ids for s in plain}
    drafter = ReplayDrafter(want, vocab_size=engine.config.vocab_size, acceptance=acceptance)
    spec, _, core = _run(engine, prompts, params, drafter, k)
    assert {s.request_id: s.output_ids for s in spec} == want
    drafted = sum(s.num_drafted for s in spec)
    accepted = sum(s.num_accepted for s in spec)
    assert drafted > 0 and (accepted == 0) == (acceptance == 0.0)
    if acceptance == 1.0:
        assert accepted == drafted  # replayed drafts of the same run are all right
    core.block_manager.check(idle=True)  # every block back in the pool, the prefix index consistent
    assert core.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("k", [1, 3])
def test_decode_steps_fall_by_exactly_the_accepted_drafts(engine: Engine, k: int) -> None:
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    params = [SamplingParams(max_tokens=N, ignore_eos=True)]
    plain, steps, _ = _run(engine, prompt, params)
    for acceptance in (1.0, 0.6):
        drafter = ReplayDrafter({"0": plain[0].output_ids}, vocab_size=engine.config.vocab_size, acceptance=acceptance)
        spec, spec_steps, _ = _run(engine, prompt, params, drafter, k)
        assert spec[0].output_ids == plain[0].output_ids
        assert spec_steps == steps - spec[0].num_accepted, (acceptance, spec_steps, steps, spec[0].num_accepted)
        if acceptance == 1.0:  # 1 prefill step, then k + 1 tokens per step
            assert spec_steps == 1 + -(-(N - 1) // (k + 1))


def test_stops_and_processors_see_every_position_in_order(engine: Engine) -> None:
    prompts = [[7, 7, 2, 9, 4], [1, 2, 3]]
    plain, _, _ = _run(engine, prompts, [SamplingParams(max_tokens=N, ignore_eos=True)] * 2)
    stop_id = plain[0].output_ids[6]
    params = [SamplingParams(max_tokens=N, ignore_eos=True, stop_token_ids=(stop_id,)),
              SamplingParams(max_tokens=N, ignore_eos=True)]
    think_end = next(t for t in range(2, 256) if t not in plain[1].output_ids)
    procs = lambda: [[], [ThinkingBudget(4, think_end)]]  # noqa: E731  (fresh processors for each run)
    want, _, _ = _run(engine, prompts, params, processors=procs())
    assert want[0].finish_reason == "stop" and want[0].output_ids[-1] == stop_id
    assert want[1].output_ids[4] == think_end  # the budget forced it, so plain and speculative outputs diverge
    for k in (1, 3):
        drafter = ReplayDrafter({"0": plain[0].output_ids, "1": plain[1].output_ids},
                                vocab_size=engine.config.vocab_size)
        got, _, core = _run(engine, prompts, params, drafter, k, processors=procs())
        assert [s.output_ids for s in got] == [s.output_ids for s in want]
        assert [s.finish_reason for s in got] == ["stop", "length"]
        assert core.block_manager.num_used_blocks == 0
