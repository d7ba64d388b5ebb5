"""Scheduler + block manager driven by a fake model runner (no tensors).

The fake runner keeps a token-level cache: each step it writes the new tokens into the slots their block
tables name, then reads the whole context back *from the cache* and predicts the next token as a hash of it.
A wrong block table, a prefix block reused with other content or a block freed while still in use changes
the prediction, so comparing against a plain reference (hash of the true token list) checks the cache
bookkeeping, not only the token flow.
"""

from __future__ import annotations

import random
from collections import abc
from collections.abc import Callable

import pytest

from deepseek_mcp.inference.engine.batch import ScheduledSeq
from deepseek_mcp.inference.engine.block_manager import BlockManager, chain_block_hashes
from deepseek_mcp.inference.engine.sampling import SamplingParams
from deepseek_mcp.inference.engine.scheduler import Scheduler, SchedulerOutput
from deepseek_mcp.inference.engine.sequence import Sequence, SeqUpdate

VOCAB = 50
EOS = 0


def next_token(context: abc.Sequence[int]) -> int:
    h = 17
    for i, t in enumerate(context):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    return 1 + h % (VOCAB - 1)  # never EOS unless a test asks for it


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeRunner:
    """Token-level paged cache; `run` returns each row's next token computed from what the cache holds."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)
        self.steps: list[list[ScheduledSeq]] = []

    def run(self, seqs: abc.Sequence[ScheduledSeq]) -> list[int]:
        self.steps.append(list(seqs))
        bs = self.block_size
        for s in seqs:
            end = s.start_pos + len(s.token_ids)
            assert len(s.block_table) == -(-end // bs), "block table does not cover exactly the context"
            for i, t in enumerate(s.token_ids):
                p = s.start_pos + i
                self.slots[s.block_table[p // bs] * bs + p % bs] = t
        out = []
        for s in seqs:
            end = s.start_pos + len(s.token_ids)
            context = [self.slots[s.block_table[p // bs] * bs + p % bs] for p in range(end)]
            assert None not in context, "read a cache slot that was never written"
            out.append(next_token(context))  # type: ignore[arg-type]
        return out


class CharDecoder:
    """Token t renders as one letter; enough for stop-string tests."""

    def step(self, token_id: int) -> str:
        return chr(ord("a") + token_id % 26)

    def flush(self) -> str:
        return ""


def check_refcounts(sched: Scheduler) -> None:
    """Every block's refcount equals the number of running sequences that hold it; pool is consistent."""
    bm = sched.bm
    bm.check()
    refs = [0] * bm.num_blocks
    for seq in sched.running:
        for b in seq.block_table:
            refs[b] += 1
    assert refs == [blk.ref_count for blk in bm.blocks]
    for seq in sched.waiting:
        assert not seq.block_table


def check_no_leaks(sched: Scheduler) -> None:
    """After a scenario: nothing queued, every block free or cached with refcount 0."""
    assert not sched.running and not sched.waiting
    sched.bm.check(idle=True)


def make(num_blocks: int = 64, block_size: int = 4, **kw) -> tuple[Scheduler, FakeRunner]:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, **kw), FakeRunner(num_blocks, block_size)


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Sequence:
    seq = Sequence(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), decoder=CharDecoder(), eos_id=EOS)
    sched.add(seq)
    return seq


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[SeqUpdate]]:
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.seqs) <= sched.max_num_seqs
    nxt = runner.run(out.scheduled) if out.scheduled else []
    updates = sched.postprocess(out, [nxt[r] for r in out.sample_rows])
    check_refcounts(sched)
    return out, updates


def run_all(
    sched: Scheduler, runner: FakeRunner, on_step: Callable[[int, SchedulerOutput], None] | None = None
) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}
    for i in range(10_000):
        if not sched.has_work():
            return results
        out, updates = step(sched, runner)
        assert out.seqs, "no progress although requests are queued"
        if on_step:
            on_step(i, out)
        for u in updates:
            results.setdefault(u.request_id, []).extend(u.new_token_ids)
    raise AssertionError("did not finish")


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------


def test_many_requests_match_reference() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = {f"r{i}": rand_prompt(rng, rng.randint(1, 30)) for i in range(10)}
    lengths = {rid: rng.randint(1, 12) for rid in prompts}
    for rid, p in prompts.items():
        add(sched, rid, p, lengths[rid])
    got = run_all(sched, runner)
    assert got == {rid: reference(p, lengths[rid]) for rid, p in prompts.items()}
    check_no_leaks(sched)


def test_admission_limited_by_max_num_seqs_and_blocks() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        add(sched, f"r{i}", rand_prompt(rng, 6), 3)
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["r0", "r1"] and len(sched.waiting) == 3
    run_all(sched, runner, lambda i, o: _assert(len(sched.running) <= 2))
    check_no_leaks(sched)

    # a pool of 4 blocks x 4 tokens admits one 12-token prompt (3 blocks) but not a second one
    sched, runner = make(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    add(sched, "a", rand_prompt(rng, 12), 2)
    add(sched, "b", rand_prompt(rng, 12), 2)
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["a"] and [s.request_id for s in sched.waiting] == ["b"]
    got = run_all(sched, runner)
    assert set(got) == {"a", "b"}
    check_no_leaks(sched)


def _assert(cond: bool) -> None:
    assert cond


def test_chunked_prefill_keeps_decodes_flowing() -> None:
    rng = random.Random()
    budget = 8
    sched, runner = make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=budget)
    short, long_prompt = rand_prompt(rng, 3), rand_prompt(rng, 50)
    add(sched, "short", short, 30)
    step(sched, runner)  # short prefilled, first token sampled
    add(sched, "long", long_prompt, 4)
    chunks: list[int] = []
    while sched.get("long") is not None and sched.get("long").num_output_tokens == 0:  # type: ignore[union-attr]
        out, updates = step(sched, runner)
        rows = {s.request_id: sched_seq for s, sched_seq in zip(out.seqs, out.scheduled, strict=True)}
        assert len(rows["short"].token_ids) == 1, "the decode did not run this step"
        assert any(u.request_id == "short" for u in updates)
        chunks.append(len(rows["long"].token_ids))
    assert len(chunks) > 3 and sum(chunks) == 50 and max(chunks) == budget - 1
    got = run_all(sched, runner)
    assert got["long"] == reference(long_prompt, 4)[1:]  # its first token came from the loop above
    check_no_leaks(sched)


def test_preemption_and_resumption_match_unpreempted_run() -> None:
    rng = random.Random()
    prompts = {f"r{i}": rand_prompt(rng, rng.randint(5, 14)) for i in range(6)}
    # 12 blocks x 4 tokens cannot hold 6 sequences of up to 34 tokens: preemptions are certain
    sched, runner = make(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    seqs = {rid: add(sched, rid, p, 20) for rid, p in prompts.items()}
    got = run_all(sched, runner)
    assert sched.num_preemptions > 0 and any(s.num_preemptions for s in seqs.values())
    assert got == {rid: reference(p, 20) for rid, p in prompts.items()}
    check_no_leaks(sched)


def test_preemption_recompute_reuses_cached_prefix() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=10, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    a, b = rand_prompt(rng, 16), rand_prompt(rng, 16)
    # a and b fill the pool after 4 tokens each; a's 6th block preempts b, whose 5 full blocks stay cached
    # (a takes only one of them, the least recently used: b's tail)
    sa = add(sched, "a", a, 8)
    sb = add(sched, "b", b, 20)
    while not sb.num_preemptions:
        step(sched, runner)
    hits_before = sched.bm.prefix_hit_tokens
    # on resumption b finds its prefix blocks still cached: it recomputes only the tail
    while sb.block_table == []:
        out, _ = step(sched, runner)
    row = out.seqs.index(sb)
    assert out.scheduled[row].start_pos >= 16
    assert sched.bm.prefix_hit_tokens == hits_before  # hit rate counts first admissions only
    run_all(sched, runner)
    assert sb.output_ids == reference(b, 20) and sa.output_ids == reference(a, 8)
    check_no_leaks(sched)


def test_abort_running_and_waiting_frees_blocks_at_once() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    add(sched, "run", rand_prompt(rng, 9), 50)
    add(sched, "wait", rand_prompt(rng, 5), 5)
    step(sched, runner)
    step(sched, runner)
    assert sched.bm.num_used_blocks == 3
    update = sched.abort("run")
    assert update == SeqUpdate("run", [], "", True, "abort")
    assert sched.bm.num_used_blocks == 0 and sched.abort("run") is None
    check_refcounts(sched)
    assert sched.abort("wait") is not None and sched.abort("nope") is None
    check_no_leaks(sched)


def test_shared_prefix_refcounts_and_cached_tokens() -> None:
    rng = random.Random()
    bs = 4
    sched, runner = make(num_blocks=32, block_size=bs, max_num_seqs=4, max_num_batched_tokens=64)
    prefix = rand_prompt(rng, 12)
    p1, p2 = prefix + rand_prompt(rng, 3), prefix + rand_prompt(rng, 5)
    s1 = add(sched, "one", p1, 10)
    step(sched, runner)  # one's three prefix blocks are computed and indexed
    s2 = add(sched, "two", p2, 10)
    out, _ = step(sched, runner)
    assert s2.num_cached_tokens == 12 and s1.num_cached_tokens == 0
    assert s2.block_table[:3] == s1.block_table[:3]
    assert [sched.bm.blocks[b].ref_count for b in s1.block_table[:3]] == [2, 2, 2]
    assert out.scheduled[out.seqs.index(s2)].token_ids == p2[12:]
    run_all(sched, runner)
    assert s1.output_ids == reference(p1, 10) and s2.output_ids == reference(p2, 10)
    assert sched.bm.prefix_hit_rate == pytest.approx(12 / (len(p1) + len(p2)))
    check_no_leaks(sched)


def test_fully_cached_prompt_recomputes_last_block() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    for n, expect_cached in ((16, 12), (18, 16)):
        prompt = rand_prompt(rng, n)
        add(sched, f"first{n}", prompt, 3)
        run_all(sched, runner)
        seq = add(sched, f"again{n}", prompt, 3)
        out, _ = step(sched, runner)
        assert seq.num_cached_tokens == expect_cached
        assert out.scheduled[0].start_pos == expect_cached and len(out.scheduled[0].token_ids) == n - expect_cached
        got = run_all(sched, runner)
        assert seq.output_ids == reference(prompt, 3) and got
        check_no_leaks(sched)


def test_conversation_continuation_reuses_history() -> None:
    rng = random.Random()
    bs = 4
    sched, runner = make(num_blocks=64, block_size=bs, max_num_seqs=2, max_num_batched_tokens=64)
    prompt = rand_prompt(rng, 10)
    s1 = add(sched, "turn1", prompt, 9)
    run_all(sched, runner)
    history = prompt + s1.output_ids  # 19 tokens; all but the last one were computed
    turn2 = history + rand_prompt(rng, 6)
    s2 = add(sched, "turn2", turn2, 5)
    run_all(sched, runner)
    assert s2.num_cached_tokens == (len(history) - 1) // bs * bs == 16
    assert s2.output_ids == reference(turn2, 5)
    check_no_leaks(sched)


def test_lru_eviction_order_across_requests() -> None:
    rng = random.Random()
    bs = 4
    sched, runner = make(num_blocks=8, block_size=bs, max_num_seqs=1, max_num_batched_tokens=64)
    pa, pb = rand_prompt(rng, 12), rand_prompt(rng, 12)
    add(sched, "a", pa, 1)
    run_all(sched, runner)
    add(sched, "b", pb, 1)
    run_all(sched, runner)
    assert sched.bm.num_cached_blocks == 6  # 3 full blocks each (the sampled token is never computed)
    # c needs 4 blocks: the 2 never-used ones, then the 2 least recently used cached ones: a's tail first
    add(sched, "c", rand_prompt(rng, 15), 1)
    run_all(sched, runner)
    assert sched.bm.num_evictions == 2
    hashes = lambda p: chain_block_hashes(p, bs)  # noqa: E731
    assert len(sched.bm.match_prefix(hashes(pb))) == 3, "the more recently used prefix must survive"
    assert len(sched.bm.match_prefix(hashes(pa))) == 1, "a's head outlives its tail"
    sb = add(sched, "b2", pb + [1], 1)
    run_all(sched, runner)
    sa = add(sched, "a2", pa + [1], 1)
    run_all(sched, runner)
    assert (sb.num_cached_tokens, sa.num_cached_tokens) == (12, 4)
    assert sa.output_ids == reference(pa + [1], 1) and sb.output_ids == reference(pb + [1], 1)
    check_no_leaks(sched)


def test_stops_and_text() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = rand_prompt(rng, 5)
    ref = reference(prompt, 12)
    text = "".join(CharDecoder().step(t) for t in ref)
    stop = text[4:6]  # two letters; its first occurrence may be earlier
    s_str = add(sched, "str", prompt, 12, stop=(stop,))
    s_id = add(sched, "id", prompt, 12, stop_token_ids=(ref[3],))
    s_len = add(sched, "len", prompt, 5)
    streamed: dict[str, str] = {}
    while sched.has_work():
        _, updates = step(sched, runner)
        for u in updates:
            streamed[u.request_id] = streamed.get(u.request_id, "") + u.text_delta
    first = text.find(stop)
    assert s_str.finish_reason == "stop" and streamed["str"] == text[:first] == s_str.text
    assert stop not in streamed["str"]
    assert s_id.finish_reason == "stop" and s_id.output_ids == ref[: ref.index(ref[3]) + 1]
    assert streamed["id"] == text[: ref.index(ref[3])]  # the stop token renders no text
    assert s_len.finish_reason == "length" and s_len.output_ids == ref[:5] and streamed["len"] == text[:5]
    check_no_leaks(sched)


def test_length_limits_and_validation() -> None:
    sched, runner = make(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    assert sched.max_model_len == 16
    with pytest.raises(ValueError, match="prompt has 16 tokens; the limit is 15"):
        add(sched, "big", list(range(1, 17)), 1)
    seq = add(sched, "fits", list(range(1, 13)), 100)  # capped by the cache: 12 + 4 tokens
    run_all(sched, runner)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 4
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "x", [1], 1)
        add(sched, "x", [1], 1)
    sched.abort("x")
    check_no_leaks(sched)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=4)


def test_random_workload_with_aborts() -> None:
    rng = random.Random()
    sched, runner = make(num_blocks=20, block_size=4, max_num_seqs=5, max_num_batched_tokens=12)
    shared = rand_prompt(rng, 9)
    expected: dict[str, list[int]] = {}
    seqs: dict[str, Sequence] = {}
    aborted: set[str] = set()
    for i in range(60):
        if rng.random() < 0.4:
            rid = f"r{i}"
            p = (shared if rng.random() < 0.5 else []) + rand_prompt(rng, rng.randint(1, 20))
            n = rng.randint(1, 15)
            seqs[rid] = add(sched, rid, p, n)
            expected[rid] = reference(p, n)
        if rng.random() < 0.1 and sched.running:
            victim = rng.choice(sched.running).request_id
            sched.abort(victim)
            aborted.add(victim)
            check_refcounts(sched)
        if sched.has_work():
            step(sched, runner)
    run_all(sched, runner)
    for rid, seq in seqs.items():
        if rid in aborted:
            assert seq.finish_reason == "abort"
            assert seq.output_ids == expected[rid][: seq.num_output_tokens]
        else:
            assert seq.output_ids == expected[rid], rid
    check_no_leaks(sched)
