"""Fair admission (issue 22 item 2): a long prefill never holds new requests out.

The scheduler splits each step's token budget max-min fairly between the prompts in prefill, running or waiting
for a slot, so a short request submitted while a long prompt prefills in tens of chunks is admitted at the next
step and gets its first token within a bounded number of steps. Checked on the scheduler alone (the fake
runner of test_scheduler: tokens, blocks, no tensors) and on the tiny checkpoint through `EngineCore`, where the
tokens of both requests must equal their solo greedy runs.
"""

from __future__ import annotations

import random
import time

import pytest
from hf_checkpoints import tiny_hf_model
from test_scheduler import add, check_no_leaks, make, rand_prompt, reference, run_all, step

from deepseek_mcp.inference.engine.core import EngineCore
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.scheduler import fair_shares
from deepseek_mcp.inference.engine.sequence import Sequence


@pytest.mark.parametrize(
    ("demands", "budget", "expected"),
    [
        ([20000, 1], 512, [511, 1]),  # the short prompt whole, the long one the rest
        ([1, 20000], 512, [1, 511]),
        ([300, 300, 5], 100, [48, 47, 5]),  # the remainder of the division goes to the earliest
        ([10, 20, 30], 100, [10, 20, 30]),  # everything fits
        ([7, 7, 7, 7], 4, [1, 1, 1, 1]),  # one token each while the budget covers one per prompt
        ([50, 50], 0, [0, 0]),
        ([], 64, []),
    ],
)
def test_fair_shares(demands: list[int], budget: int, expected: list[int]) -> None:
    shares = fair_shares(demands, budget)
    assert shares == expected
    assert sum(shares) == min(budget, sum(demands)) and all(0 <= s <= d for s, d in zip(shares, demands))


def test_fair_shares_random_is_max_min_fair() -> None:
    rng = random.Random()
    for _ in range(200):
        demands = [rng.randint(1, 400) for _ in range(rng.randint(1, 8))]
        budget = rng.randint(len(demands), 600)
        shares = fair_shares(demands, budget)
        assert sum(shares) == min(budget, sum(demands)) and all(1 <= s <= d for s, d in zip(shares, demands))
        level = max(shares)
        # nobody capped below the level unless its whole demand is met (up to the division's remainder of 1)
        assert all(s == d or s >= level - 1 for s, d in zip(shares, demands)), (demands, budget, shares)


def test_short_request_admitted_while_a_long_prompt_prefills() -> None:
    """Budget 8: a 400-token prompt takes 50+ chunks. A 1-token request submitted after its third chunk gets its
    first token in the next step (it used to wait for the whole prefill); the long prompt keeps going every
    step and a running decode is never skipped."""
    rng = random.Random()
    budget = 8
    sched, runner = make(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=budget)
    decoder_prompt, long_prompt, short_prompt = rand_prompt(rng, 3), rand_prompt(rng, 400), rand_prompt(rng, 1)
    add(sched, "decoder", decoder_prompt, 120)
    step(sched, runner)  # the decoder is prefilled and decodes from now on
    long_seq = add(sched, "long", long_prompt, 3)
    for _ in range(3):
        out, _ = step(sched, runner)
        assert long_seq in out.seqs
    short = add(sched, "short", short_prompt, 2)
    steps_to_first = 0
    while short.num_output_tokens == 0:
        out, _ = step(sched, runner)
        steps_to_first += 1
        rows = {s.request_id: len(r.token_ids) for s, r in zip(out.seqs, out.scheduled, strict=True)}
        assert rows["decoder"] == 1 and rows["long"] > 0, rows
    assert steps_to_first == 1
    assert long_seq.num_output_tokens == 0 and long_seq.num_computed_tokens < 100  # still far from done
    got = run_all(sched, runner)
    assert short.output_ids == reference(short_prompt, 2)
    assert long_seq.output_ids == reference(long_prompt, 3) and got["decoder"]
    check_no_leaks(sched)


def test_requests_sharing_a_prefix_in_flight_wait_for_it_instead_of_computing_it_again() -> None:
    """Four requests with the same 40-token system prompt arrive together (budget 8): the first is admitted,
    the others wait until it has computed the shared blocks and then take them from the prefix cache (fair
    admission alone admitted all four at once and computed the shared prefix four times); an unrelated request
    is still admitted at once; every output is the reference."""
    rng = random.Random()
    sched, runner = make(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    shared = rand_prompt(rng, 40)
    prompts = {f"s{i}": shared + rand_prompt(rng, 3) for i in range(4)}
    seqs = {rid: add(sched, rid, p, 3) for rid, p in prompts.items()}
    other = add(sched, "other", rand_prompt(rng, 6), 3)
    out, _ = step(sched, runner)
    assert {s.request_id for s in out.seqs} == {"s0", "other"}
    run_all(sched, runner)
    assert sched.bm.prefix_hit_rate > 0
    for rid in ("s1", "s2", "s3"):
        assert seqs[rid].num_cached_tokens == 40, (rid, seqs[rid].num_cached_tokens)  # the 10 shared blocks
    for rid, p in prompts.items():
        assert seqs[rid].output_ids == reference(p, 3)
    assert other.output_ids == reference(other.prompt_ids, 3)
    check_no_leaks(sched)


def test_first_token_bound_with_several_long_prompts() -> None:
    """Three long prompts in prefill and a 30-token request: the request gets a fair share (budget / 4) from the
    step after it arrives, so its first token comes within ceil(30 / (budget / 4)) steps, not after ~600 tokens
    of the other prompts; every long prompt still progresses each step."""
    rng = random.Random()
    budget = 32
    sched, runner = make(num_blocks=512, block_size=4, max_num_seqs=8, max_num_batched_tokens=budget)
    longs = [add(sched, f"long{i}", rand_prompt(rng, 200 + 10 * i), 2) for i in range(3)]
    step(sched, runner)
    medium_prompt = rand_prompt(rng, 30)
    medium = add(sched, "medium", medium_prompt, 2)
    bound = -(-30 // (budget // 4))
    for _ in range(bound):
        out, _ = step(sched, runner)
        assert all(s in out.seqs for s in longs)
        if medium.num_output_tokens:
            break
    assert medium.num_output_tokens == 1, f"no first token after {bound} steps"
    assert all(s.num_output_tokens == 0 for s in longs)
    run_all(sched, runner)
    assert medium.output_ids == reference(medium_prompt, 2)
    assert all(s.output_ids == reference(s.prompt_ids, 2) for s in longs)
    check_no_leaks(sched)


# ---- through the model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("tiny_fair")
    tiny_hf_model(path, seed=11)
    return Engine.from_pretrained(path, device="cpu", dtype="float32")


def test_engine_short_request_first_token_while_long_prefills(engine: Engine) -> None:
    """Tiny fp32 checkpoint, budget 8 tokens per step: a 232-token prompt prefills in 29+ chunks; a 1-token
    request submitted after 4 of them has its first token after one step. Both outputs equal their solo greedy
    runs. The wall times (per step, and the short request's time to first token) are printed with -s."""
    rng = random.Random()
    long_prompt = [rng.randrange(2, 256) for _ in range(232)]
    short_prompt = [rng.randrange(2, 256)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    solo = [engine.generate([p], params)[0].token_ids for p in (long_prompt, short_prompt)]

    core = EngineCore(engine, max_num_seqs=4, max_num_batched_tokens=8, cache_tokens=1024, block_size=4,
                      warm_up=False)
    long_seq = Sequence("long", long_prompt, params)
    core.scheduler.add(long_seq)
    for _ in range(4):
        assert core.step().error is None
    short = Sequence("short", short_prompt, params)
    core.scheduler.add(short)
    submitted, steps_to_first, step_times = time.perf_counter(), 0, []
    while short.num_output_tokens == 0:
        t0 = time.perf_counter()
        result = core.step()
        step_times.append(time.perf_counter() - t0)
        assert result.error is None
        steps_to_first += 1
    ttft = time.perf_counter() - submitted
    assert steps_to_first == 1
    assert long_seq.num_output_tokens == 0  # the long prompt is still prefilling
    long_start = time.perf_counter()
    while core.scheduler.has_work():
        assert core.step().error is None
    long_rest = time.perf_counter() - long_start
    core.close()
    print(f"\nshort request: first token after {steps_to_first} step(s), {ttft * 1e3:.1f} ms "
          f"(step {max(step_times) * 1e3:.1f} ms); the long prompt needed {long_rest:.2f} s more")
    assert short.output_ids == solo[1]
    assert long_seq.output_ids == solo[0]
