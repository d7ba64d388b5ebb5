"""AsyncEngine on a tiny random DeepSeek-V3 checkpoint (fp32, CPU): continuous batching must give the same
greedy tokens as one-request-at-a-time `Engine.generate`, with and without prefix-cache hits; aborts and
cancellations must return cache blocks at once; stop strings, seeds and logits processors must hold."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
import torch
from hf_checkpoints import tiny_hf_model

from deepseek_mcp.inference.engine.async_engine import AsyncEngine, EngineClosedError, RequestOutput
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.runner import CacheMemoryError
from deepseek_mcp.inference.engine.sampling import SamplingParams

pytest.importorskip("transformers")

VOCAB = 256


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("tiny_async")
    tiny_hf_model(path, seed=11)
    return Engine.from_pretrained(path, device="cpu", dtype="float32")


def rand_prompts(lengths: list[int], seed: int | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def generate_each(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """The reference: each prompt alone through `Engine.generate`. Run on a worker thread like the async
    engine's steps (on this 2-core machine torch's intra-op threads are far slower from the main thread)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: [engine.generate([p], sp)[0] for p, sp in zip(prompts, plist, strict=True)]
                           ).result()


def check_no_leaks(aeng: AsyncEngine) -> None:
    """Every block free or cached with refcount 0; nothing queued."""
    assert not aeng.scheduler.running and not aeng.scheduler.waiting
    aeng.block_manager.check(idle=True)


async def collect(aeng: AsyncEngine, prompt: list[int], params: SamplingParams, **kw) -> list[RequestOutput]:
    return [out async for out in aeng.stream(prompt, params, **kw)]


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.002)


def run(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main)


def test_concurrent_greedy_matches_generate_then_prefix_hits(engine: Engine) -> None:
    lengths, max_tokens = [3, 9, 17, 30, 5, 61, 12, 40], [5, 9, 13, 7, 11, 6, 10, 8]
    prompts = rand_prompts(lengths)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    expected = generate_each(engine, prompts, params)
    shared = rand_prompts([37])[0]
    prompts2 = [shared + p[:4] for p in prompts]  # second round: a long common prefix
    expected2 = generate_each(engine, prompts2, params)

    async def main() -> None:
        # small blocks and a small token budget: chunked prefill, many block boundaries
        async with AsyncEngine(engine, max_num_seqs=8, max_num_batched_tokens=24, cache_tokens=2048,
                               block_size=4) as aeng:
            results: dict[int, list[RequestOutput]] = {}

            async def one(i: int, prompt: list[int]) -> None:
                results[i] = await collect(aeng, prompt, params[i])

            async with anyio.create_task_group() as tg:
                for i, p in enumerate(prompts):
                    tg.start_soon(one, i, p)
            for i, outs in results.items():
                assert [t for o in outs for t in o.new_token_ids] == expected[i].token_ids, f"request {i}"
                assert outs[-1].token_ids == expected[i].token_ids and outs[-1].finished
                assert outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])
                assert "".join(o.text_delta for o in outs) == expected[i].text
                assert outs[-1].num_prompt_tokens == lengths[i]
                assert outs[-1].stats.ttft_s is not None and outs[-1].stats.ttft_s > 0
            check_no_leaks(aeng)

            first = await collect(aeng, prompts2[0], params[0])  # warms the cache with the shared prefix
            assert first[-1].token_ids == expected2[0].token_ids
            results.clear()
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(prompts2[1:], start=1):
                    tg.start_soon(one, i, p)
            for i, outs in results.items():
                assert outs[-1].token_ids == expected2[i].token_ids, f"request {i} with a prefix hit"
                assert outs[-1].num_cached_tokens == 36  # 9 full blocks of the 37-token prefix
            stats = aeng.stats()
            assert stats.prefix_hit_tokens == 7 * 36 and 0 < stats.prefix_hit_rate < 1
            assert stats.running == 0 and stats.waiting == 0 and stats.cache_usage == 0.0
            check_no_leaks(aeng)

    run(main)


def test_preemption_under_a_small_cache_keeps_outputs(engine: Engine) -> None:
    prompts = rand_prompts([18, 22, 15, 25, 20])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = [o.token_ids for o in generate_each(engine, prompts, params)]

    async def main() -> None:
        # 24 blocks x 4 tokens; five requests of up to 41 tokens (11 blocks) cannot all stay resident
        async with AsyncEngine(engine, max_num_seqs=5, max_num_batched_tokens=64, cache_tokens=96,
                               block_size=4) as aeng:
            results: dict[int, list[int]] = {}
            peak = {"running": 0, "waiting": 0}

            async def one(i: int) -> None:
                results[i] = (await collect(aeng, prompts[i], params))[-1].token_ids

            async def watch() -> None:
                while True:
                    s = aeng.stats()
                    peak["running"] = max(peak["running"], s.running)
                    peak["waiting"] = max(peak["waiting"], s.waiting)
                    assert 0.0 <= s.cache_usage <= 1.0
                    await anyio.sleep(0.001)

            async with anyio.create_task_group() as outer:
                outer.start_soon(watch)
                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(one, i)
                outer.cancel_scope.cancel()
            assert aeng.stats().num_preemptions > 0
            assert peak["running"] >= 2 and peak["waiting"] >= 1
            assert [results[i] for i in range(len(prompts))] == expected
            check_no_leaks(aeng)

    run(main)


def test_conversation_continuation_and_fully_cached_prompt(engine: Engine) -> None:
    prompt = rand_prompts([21])[0]
    params = SamplingParams(max_tokens=11, ignore_eos=True)

    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=4, cache_tokens=1024, block_size=4) as aeng:
            turn1 = await collect(aeng, prompt, params)
            again = await collect(aeng, prompt, params)  # same prompt: all but the last block from the cache
            assert again[-1].num_cached_tokens == 20 and again[-1].token_ids == turn1[-1].token_ids
            history = prompt + turn1[-1].token_ids  # 32 tokens, the last one never computed
            turn2_prompt = history + rand_prompts([5])[0]
            turn2 = await collect(aeng, turn2_prompt, params)
            assert turn2[-1].num_cached_tokens == 28
            assert turn2[-1].token_ids == generate_each(engine, [turn2_prompt], params)[0].token_ids
            check_no_leaks(aeng)

    run(main)


def test_abort_from_another_thread_frees_blocks_within_one_step(engine: Engine) -> None:
    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=4, cache_tokens=1024, block_size=4) as aeng:
            other = rand_prompts([10])[0]
            bystander_params = SamplingParams(max_tokens=30, ignore_eos=True)
            expected = generate_each(engine, [other], bystander_params)[0].token_ids
            bystander: list[RequestOutput] = []

            async def run_bystander() -> None:
                bystander.extend(await collect(aeng, other, bystander_params))

            outs: list[RequestOutput] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_bystander)
                stream = aeng.stream(rand_prompts([20])[0], SamplingParams(max_tokens=500, ignore_eos=True),
                                     request_id="victim")
                async for out in stream:
                    outs.append(out)
                    if len(outs) == 3:
                        steps = aeng.stats().num_steps
                        t = threading.Thread(target=aeng.abort, args=("victim",))
                        t.start()
                        t.join()
                assert outs[-1].finished and outs[-1].finish_reason == "abort"
                assert 3 <= len(outs) <= 5  # at most one more token after the abort
                assert aeng.stats().num_steps - steps <= 1
                assert aeng.scheduler.get("victim") is None
                held = sum(len(s.block_table) for s in aeng.scheduler.running)
                assert aeng.block_manager.num_used_blocks == held  # only the bystander's blocks
            assert bystander[-1].token_ids == expected  # unaffected by the abort
            check_no_leaks(aeng)

    run(main)


def test_leaving_the_stream_or_cancelling_aborts(engine: Engine) -> None:
    long = SamplingParams(max_tokens=500, ignore_eos=True)

    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=4, cache_tokens=1024, block_size=4) as aeng:
            # break out of the loop (the generator is closed by the event loop's finalizer)
            async for out in aeng.stream(rand_prompts([12])[0], long, request_id="left"):
                if len(out.token_ids) == 2:
                    steps = aeng.stats().num_steps
                    break
            await wait_until(lambda: aeng.scheduler.get("left") is None)
            assert aeng.stats().num_steps - steps <= 2
            check_no_leaks(aeng)

            # cancel the consuming task mid-generation
            seen = anyio.Event()

            async def consume() -> None:
                async for out in aeng.stream(rand_prompts([12])[0], long, request_id="cancelled"):
                    if len(out.token_ids) == 2:
                        seen.set()

            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await seen.wait()
                    scope.cancel()
            await wait_until(lambda: aeng.scheduler.get("cancelled") is None, 2.0)
            check_no_leaks(aeng)
            # the engine still serves
            done = await collect(aeng, rand_prompts([5])[0], SamplingParams(max_tokens=3, ignore_eos=True))
            assert len(done[-1].token_ids) == 3
            check_no_leaks(aeng)

    run(main)


def test_stop_strings_seeds_and_processors(engine: Engine) -> None:
    prompt = rand_prompts([15])[0]
    base = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = generate_each(engine, [prompt], base)[0]
    text = ref.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    cut = text.find(stop)

    class Recorder:
        def __init__(self) -> None:
            self.prepared: list[int] = []

        def prepare(self, output_ids: list[int]) -> None:
            self.prepared.append(len(output_ids))

        def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            assert self.prepared and self.prepared[-1] == len(output_ids)
            return logits

    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=8, cache_tokens=1024, block_size=4) as aeng:
            outs = await collect(aeng, prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))
            streamed = "".join(o.text_delta for o in outs)
            assert outs[-1].finish_reason == "stop" and streamed == text[:cut] and stop not in streamed
            assert outs[-1].stop == stop and all(o.stop is None for o in outs[:-1])  # what matched, carried out
            stop_id = ref.token_ids[3]  # a stop token: its id is what matched
            by_id = SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop_id,))
            outs = await collect(aeng, prompt, by_id)
            assert outs[-1].finish_reason == "stop" and outs[-1].stop == stop_id
            outs = await collect(aeng, prompt, SamplingParams(max_tokens=3, ignore_eos=True))
            assert outs[-1].finish_reason == "length" and outs[-1].stop is None

            sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
            runs: dict[str, list[int]] = {}

            async def one(name: str, params: SamplingParams) -> None:
                runs[name] = (await collect(aeng, prompt, params))[-1].token_ids

            async with anyio.create_task_group() as tg:  # same seed, different company: same tokens
                tg.start_soon(one, "a", sampled)
                tg.start_soon(one, "noise", SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
            await one("b", sampled)
            await one("c", SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
            assert runs["a"] == runs["b"] and runs["a"] != runs["c"]

            think_end = next(t for t in range(2, VOCAB) if t not in ref.token_ids[:3])  # not a token it emits first
            rec = Recorder()
            outs = await collect(aeng, prompt, base, logits_processors=[rec, ThinkingBudget(3, think_end)])
            ids = outs[-1].token_ids
            assert ids[:3] == ref.token_ids[:3] and ids[3] == think_end
            assert rec.prepared == list(range(24))
            check_no_leaks(aeng)

    run(main)


def test_thinking_budget_unit() -> None:
    tb = ThinkingBudget(2, think_end_id=5)
    logits = torch.randn(10)
    assert torch.equal(tb([1], logits.clone()), logits)
    forced = tb([1, 2], logits.clone())
    assert int(forced.argmax()) == 5 and torch.isinf(forced[torch.arange(10) != 5]).all()
    assert torch.equal(tb([1, 2, 5, 3], logits.clone()), logits)  # closed: no more forcing
    with pytest.raises(ValueError, match="thinking budget must be >= 0"):
        ThinkingBudget(-1)


def test_errors_and_memory_check(engine: Engine) -> None:
    with pytest.raises(CacheMemoryError, match="lower the `cache_tokens` setting"):
        AsyncEngine(engine, cache_tokens=10**12)
    with pytest.raises(ValueError, match="cache_tokens"):
        AsyncEngine(engine, cache_tokens=3, block_size=4)

    async def main() -> None:
        aeng = AsyncEngine(engine, max_num_seqs=2, cache_tokens=64, block_size=4)
        with pytest.raises(EngineClosedError, match="not running"):
            aeng.stream([5], SamplingParams())
        async with aeng:
            with pytest.raises(ValueError, match="at most 63 fit"):
                aeng.stream(list(range(2, 66)), SamplingParams())
            with pytest.raises(ValueError, match="outside the vocabulary"):
                aeng.stream([VOCAB + 5], SamplingParams())
            outs = await collect(aeng, list(range(2, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
            assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 64 - 58  # capped by cache
            first = aeng.stream([5, 6], SamplingParams(max_tokens=50, ignore_eos=True), request_id="dup")
            await first.__anext__()
            with pytest.raises(ValueError, match="already in use"):
                await collect(aeng, [5, 6], SamplingParams(), request_id="dup")
            # shutting down ends unfinished requests with "abort"
            started = time.monotonic()
        rest = [o async for o in first]
        assert rest[-1].finish_reason == "abort" and time.monotonic() - started < 5
        with pytest.raises(EngineClosedError):
            aeng.stream([5], SamplingParams())
        check_no_leaks(aeng)

    run(main)


def test_bounded_waiting_queue_refuses_at_once(engine: Engine) -> None:
    from deepseek_mcp.inference.engine.async_engine import QueueFullError

    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=1, cache_tokens=1024, block_size=4, max_waiting=1) as aeng:
            async with anyio.create_task_group() as tg:
                first, second = rand_prompts([6, 7])
                tg.start_soon(collect, aeng, first, params)
                await wait_until(lambda: aeng.stats().running == 1)
                tg.start_soon(collect, aeng, second, params)  # waits: one running is the most
                await wait_until(lambda: aeng.num_waiting() == 1)
                started = time.monotonic()
                with pytest.raises(QueueFullError, match="bound is 1"):
                    aeng.stream(rand_prompts([5])[0], params)
                assert time.monotonic() - started < 0.1
                tg.cancel_scope.cancel()
            await wait_until(lambda: aeng.num_waiting() == 0 and aeng.stats().running == 0)
            check_no_leaks(aeng)

    run(main)


def test_waiting_bound_counts_only_requests_without_a_slot(engine: Engine) -> None:
    """`max_waiting` bounds the requests a free batch slot cannot take: with 4 slots and a bound of 2, 8 requests
    sent one after another get 6 streams (4 running, 2 waiting) and 2 refusals (the bound once counted every
    request not yet running, so requests the free slots were about to take were refused)."""
    from deepseek_mcp.inference.engine.async_engine import QueueFullError

    params = SamplingParams(max_tokens=1000, ignore_eos=True)  # none finishes while the test submits

    async def main() -> None:
        async with AsyncEngine(engine, max_num_seqs=4, cache_tokens=8192, block_size=4, max_waiting=2) as aeng:
            accepted, refused = 0, 0
            async with anyio.create_task_group() as tg:
                for prompt in rand_prompts([5] * 8):
                    try:
                        stream = aeng.stream(prompt, params)
                    except QueueFullError as e:
                        refused += 1
                        assert "4 batch slots" in str(e) and "bound is 2" in str(e)
                        continue
                    accepted += 1
                    tg.start_soon(_drain, stream)
                    await wait_until(lambda n=accepted: aeng.num_waiting() + aeng.stats().running == n)
                assert (accepted, refused) == (6, 2)
                await wait_until(lambda: aeng.stats().running == 4)  # the slots fill over the next steps
                assert aeng.num_without_slot() == 2 and aeng.num_waiting() == 2
                tg.cancel_scope.cancel()
            await wait_until(lambda: aeng.num_waiting() == 0 and aeng.stats().running == 0)
            check_no_leaks(aeng)

    run(main)


async def _drain(stream: AsyncIterator[RequestOutput]) -> None:
    async for _ in stream:
        pass
