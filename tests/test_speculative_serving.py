"""Speculative decoding's verify path (issue 24, `ReplayDrafter` and drafters built here) as the server runs it.

Sampling keeps the target distribution: verified paths against the exact law of sequential target draws
(chi-square, fixed seeds, p > 1e-3), on fixed logits and end to end through `EngineCore`. Greedy and seeded
outputs equal K = 0's through the async engine (unequal prompts arriving at different steps, chunked prefill,
speculative and plain rows in one batch), under preemption, with prefix-cache hits on blocks that verify rows
filled, through the MCP tools (a stop string, the thinking budget, a constrained tool call whose arguments
validate) and on two tensor-parallel ranks; every cache block is free afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import anyio
import jsonschema
import pytest
import torch
from hf_checkpoints import tiny_hf_model

from deepseek_mcp.inference.engine.async_engine import AsyncEngine, RequestOutput
from deepseek_mcp.inference.engine.core import EngineCore, verify
from deepseek_mcp.inference.engine.engine import Engine
from deepseek_mcp.inference.engine.logits_process import ThinkingBudget
from deepseek_mcp.inference.engine.sampling import SamplingParams, sample
from deepseek_mcp.inference.engine.sequence import Sequence
from deepseek_mcp.inference.engine.speculative import ReplayDrafter, emitted_tokens

pytest.importorskip("transformers")
R = TypeVar("R")
VOCAB = 256  # the tiny checkpoints'
P_MIN = 1e-3  # a chi-square p-value below this fails (each test draws from its own fixed seed)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec_serving")
    tiny_hf_model(path, seed=11)
    return path


@pytest.fixture(scope="module")
def engine(tiny_path: Path) -> Engine:
    return Engine.from_pretrained(tiny_path, device="cpu", dtype="float32")


def on_worker(fn: Callable[[], R]) -> R:
    """fn() on a worker thread, where the async engine runs its steps too (on a 2-core machine torch's intra-op
    threads are far slower from the main thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def drive(core: EngineCore, seqs: list[Sequence]) -> None:
    """Every sequence through `core` to the end."""

    def steps() -> None:
        for s in seqs:
            core.scheduler.add(s)
        while core.scheduler.has_work():
            result = core.step()
            if result.error is not None:
                raise result.error
        core.close()

    on_worker(steps)


# ---------------------------------------------------------------------------------------------------------
# The law of a verified path


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] float64: the distribution `sample` draws from (temperature, then top-k, then top-p on the survivors)."""
    x = logits.double() / params.temperature
    order = x.argsort(descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[order[: params.top_k or len(x)]] = True
    p = x.masked_fill(~keep, float("-inf")).softmax(-1)
    mass_before = p[order].cumsum(0) - p[order]
    drop = order[(mass_before >= params.top_p) & (torch.arange(len(x)) > 0)]
    p[drop] = 0.0
    return p / p.sum()


def path_law(probs: list[torch.Tensor], drafts: list[int]) -> dict[tuple[int, ...], float]:
    """Probability of every path a verification of `drafts` can emit, when position j draws from probs[j]: the
    target's draws up to the first that differs from its draft (all len(drafts) + 1 when none does)."""
    law: dict[tuple[int, ...], float] = {}
    prefix, mass = (), 1.0
    for j, p in enumerate(probs):
        for t in range(len(p)):
            if j == len(drafts) or t != drafts[j]:
                law[(*prefix, t)] = mass * float(p[t])
        if j == len(drafts):
            break
        prefix, mass = (*prefix, drafts[j]), mass * float(p[drafts[j]])
    return law


def chi_square_p(counts: dict[tuple[int, ...], int], law: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """(p-value, degrees of freedom) of Pearson's goodness-of-fit test of the observed paths against `law`. Paths
    expected fewer than 5 times are pooled into one bin; a path of probability 0 must never be seen."""
    n = sum(counts.values())
    unknown = {k: c for k, c in counts.items() if law.get(k, 0.0) == 0.0}
    assert not unknown, f"paths of probability 0 drawn: {unknown}"
    bins: list[tuple[float, float]] = []  # (observed, expected)
    pooled = [0.0, 0.0]
    for path, q in law.items():
        if q == 0.0:
            continue
        obs, exp = counts.get(path, 0), n * q
        if exp < 5:
            pooled[0] += obs
            pooled[1] += exp
        else:
            bins.append((obs, exp))
    if pooled[1] > 0:
        bins.append((pooled[0], pooled[1]))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    dof = len(bins) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(p), dof


def tally(paths: list[list[int]]) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for path in paths:
        counts[tuple(path)] = counts.get(tuple(path), 0) + 1
    return counts


def identity(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    return logits  # a processor that changes nothing: verify then samples position by position


# ---------------------------------------------------------------------------------------------------------
# Sampling keeps the target distribution


@pytest.mark.parametrize(("params", "processors"), [
    pytest.param(SamplingParams(temperature=1.0), (), id="batched"),
    pytest.param(SamplingParams(temperature=0.8, top_k=6, top_p=0.9), (), id="batched-top-k-top-p"),
    pytest.param(SamplingParams(temperature=1.0), (identity,), id="per-position"),
])
def test_verified_paths_follow_the_target_law(params: SamplingParams, processors: tuple) -> None:
    """Unseeded draws (keys from torch's generator, seeded here) of `verify` on fixed logits [1 + K, V], V = 8,
    K = 2: the first draft the likeliest token of row 0, the second a less likely one, so every kind of path
    (rejected at 0, at 1, all accepted) is frequent. Against the exact law, and plain sampling against it too."""
    n, vocab = 4000, 8
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(27))  # [1 + K, V]
    probs = [target_probs(row, params) for row in logits]
    drafts = [int(probs[0].argmax()), int(probs[1].argsort(descending=True)[1])]
    law = path_law(probs, drafts)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    torch.manual_seed(2024)
    seq = Sequence("r", [1, 2, 3], params, logits_processors=processors)
    spec = tally([verify(seq, drafts, logits) for _ in range(n)])
    p_spec, dof = chi_square_p(spec, law)
    # plain decoding of the same three positions: one draw per position, kept up to the first mismatch
    targets = [sample(logits[j].expand(n, vocab).contiguous(), [params] * n, [j] * n).tolist() for j in range(3)]
    plain = tally([emitted_tokens(drafts, list(t)) for t in zip(*targets, strict=True)])
    p_plain, _ = chi_square_p(plain, law)
    assert dof >= 10, dof  # enough bins for the test to see a skew
    assert p_spec > P_MIN and p_plain > P_MIN, (p_spec, p_plain, spec, law)
    accepted = sum(c for path, c in spec.items() if len(path) > 1)
    assert 0.25 < accepted / n < 0.75  # both outcomes of the first draft are well sampled


class FixedDrafter:
    """Drafts `drafts` for a sequence whose output so far is `after`; nothing otherwise."""

    def __init__(self, after: list[int], drafts: list[int]) -> None:
        self.after, self.drafts = after, drafts

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return self.drafts[:k] if seq.output_ids == self.after else []


def test_engine_core_samples_the_target_law(engine: Engine) -> None:
    """End to end: 800 unseeded requests of one prompt (temperature 0.3, 4 tokens) in one `EngineCore`, K = 2.
    The first token comes from the prefill; a request whose first token is the likeliest one, a0, verifies the
    drafts d1, d2 (the greedy continuation of prompt + a0) in one step. Its next three tokens, cut at the first
    that differs from its draft, must follow the law of sequential target draws (computed from `Engine.logits`)."""
    n, temp = 800, 0.3
    params = SamplingParams(temperature=temp, max_tokens=4, ignore_eos=True)

    def next_probs(context: list[int]) -> torch.Tensor:
        return target_probs(engine.logits(context)[-1], params)

    def greedy_law(prompt: list[int]) -> list[torch.Tensor]:
        """The next token's distribution after the prompt and after each of its next 3 greedy tokens."""
        context, probs = list(prompt), []
        for _ in range(4):
            probs.append(next_probs(context))
            context.append(int(probs[-1].argmax()))
        return probs

    g = torch.Generator().manual_seed(24)
    candidates = [torch.randint(2, VOCAB, (6,), generator=g).tolist() for _ in range(16)]
    firsts = on_worker(lambda: [float(next_probs(p).max()) for p in candidates])
    prompt = candidates[max(range(len(candidates)), key=firsts.__getitem__)]
    p0, *probs = on_worker(lambda: greedy_law(prompt))
    a0 = int(p0.argmax())
    assert p0[a0] > 0.3, "no prompt of the tiny model has a likely first token at this temperature"
    drafts = [int(probs[0].argmax()), int(probs[1].argmax())]
    torch.manual_seed(2024)
    core = EngineCore(engine, max_num_seqs=n, max_num_batched_tokens=8 * n, cache_tokens=16 * n, block_size=4,
                      warm_up=False, drafter=FixedDrafter([a0], drafts), speculative_tokens=2)
    seqs = [Sequence(str(i), prompt, params) for i in range(n)]
    drive(core, seqs)
    verified = [s for s in seqs if s.output_ids[0] == a0]
    assert sum(s.num_drafted for s in seqs) == 2 * len(verified) > n * 0.3
    counts = tally([emitted_tokens(drafts, s.output_ids[1:]) for s in verified])
    p, dof = chi_square_p(counts, path_law(probs, drafts))
    assert dof >= 5 and p > P_MIN, (p, dof, counts)
    core.block_manager.check(idle=True)


# ---------------------------------------------------------------------------------------------------------
# Greedy and seeded outputs equal K = 0's through the async engine


@dataclass
class Job:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int = 0  # submitted once the engine has taken this many steps
    processors: Callable[[], list[Any]] | None = None  # a fresh set for each run


@dataclass
class WatchingDrafter(ReplayDrafter):
    """A ReplayDrafter that keeps the sequences it drafted for (their draft and acceptance counts)."""

    seqs: dict[str, Sequence] = field(default_factory=dict, init=False)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        self.seqs[seq.request_id] = seq
        return super().propose(seq, k)

    @property
    def accepted(self) -> int:
        return sum(s.num_accepted for s in self.seqs.values())


def plain_outputs(engine: Engine, jobs: list[Job]) -> dict[str, list[int]]:
    """K = 0: each request alone through `Engine.generate`."""
    return on_worker(lambda: {j.rid: engine.generate([j.prompt], j.params)[0].token_ids for j in jobs})


def test_generate_verifies_every_draft_whatever_the_prompt_length(engine: Engine) -> None:
    """`Engine.generate`'s token budget holds a decode and its K drafts, even when the prompts are shorter: K = 3,
    12 tokens, drafts always right: 3 + 3 + 2 drafts verified (the first token comes from the prefill)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def check(prompt: list[int]) -> None:
        want = engine.generate([prompt], params)[0].token_ids
        drafter = WatchingDrafter({"0": want}, VOCAB)
        assert engine.generate([prompt], params, drafter=drafter, speculative_tokens=3)[0].token_ids == want
        assert (drafter.seqs["0"].num_drafted, drafter.seqs["0"].num_accepted) == (8, 8), prompt

    for prompt in ([5], [5, 6], [5, 6, 7, 8, 9]):
        on_worker(lambda: check(prompt))  # noqa: B023  (called at once)


def serve(engine: Engine, rounds: list[list[Job]], drafter: ReplayDrafter | None = None, k: int = 0,
          **options) -> tuple[dict[str, RequestOutput], AsyncEngine]:
    """Each round's jobs through one AsyncEngine (a round starts when the one before it has finished; a job
    arrives at its step); the last output of every request. Every block is free at the end."""

    async def main() -> tuple[dict[str, RequestOutput], AsyncEngine]:
        async with AsyncEngine(engine, drafter=drafter, speculative_tokens=k, **options) as aeng:
            outs: dict[str, RequestOutput] = {}

            async def one(job: Job) -> None:
                with anyio.fail_after(60):
                    while aeng.num_steps < job.arrive:
                        await anyio.sleep(0.001)
                procs = job.processors() if job.processors else ()
                async for out in aeng.stream(job.prompt, job.params, request_id=job.rid, logits_processors=procs):
                    outs[job.rid] = out

            for jobs in rounds:
                async with anyio.create_task_group() as tg:
                    for job in jobs:
                        tg.start_soon(one, job)
            assert not aeng.scheduler.running and not aeng.scheduler.waiting
            aeng.block_manager.check(idle=True)  # every block free or cached, the prefix index consistent
            assert aeng.block_manager.num_used_blocks == 0
            return outs, aeng

    return anyio.run(main)


def prompts(*lengths: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_async_batches_equal_plain_decoding(engine: Engine, k: int) -> None:
    """Unequal prompts arriving at different steps, three slots for six requests (some queue), a 16-token budget
    (prefills in chunks beside verify rows): greedy and seeded rows, one request the drafter knows nothing of
    (plain rows in the same steps). Drafts right 70% of the time."""
    greedy = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 9, 14, 7, 11)]
    seeded = SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, top_p=0.9, seed=5)
    jobs = [Job(str(i), p, sp, arrive) for i, (p, sp, arrive) in enumerate(zip(
        prompts(3, 17, 9, 30, 5, 26, seed=k), [*greedy, seeded], (0, 0, 1, 3, 4, 6), strict=True))]
    want = plain_outputs(engine, jobs)
    drafter = WatchingDrafter({rid: ids for rid, ids in want.items() if rid != "3"}, VOCAB, acceptance=0.7)
    got, _ = serve(engine, [jobs], drafter, k, max_num_seqs=3, max_num_batched_tokens=16, cache_tokens=1024,
                   block_size=4)
    assert {rid: o.token_ids for rid, o in got.items()} == want
    assert all(o.finish_reason == "length" for o in got.values())
    assert "3" in drafter.seqs and drafter.seqs["3"].num_drafted == 0
    assert drafter.accepted > 0 and sum(s.num_drafted for s in drafter.seqs.values()) > drafter.accepted


def test_async_processors_see_every_verified_position(engine: Engine) -> None:
    """Requests with processors through the async engine, K = 0 and K = 3: penalties on the output so far and a
    logprob recorder (the server's), a thinking budget. The same tokens, and logprobs within 1e-4 (a verify row's
    logits are a decode row's up to float32 rounding)."""
    from deepseek_mcp.mcp_server.request_processors import LogprobRecorder, Penalties

    recorders: list[LogprobRecorder] = []

    def penalized() -> list[Any]:
        recorders.append(LogprobRecorder(top_n=2))
        return [recorders[-1], Penalties(presence=0.4, frequency=0.3)]

    first, second = prompts(9, 14, seed=6)
    jobs = [Job("p", first, SamplingParams(max_tokens=14, ignore_eos=True), 0, penalized),
            Job("t", second, SamplingParams(max_tokens=12, ignore_eos=True), 1, lambda: [ThinkingBudget(5, 7)])]
    options = dict(max_num_seqs=2, max_num_batched_tokens=16, cache_tokens=512, block_size=4)
    plain, _ = serve(engine, [jobs], **options)
    want = {rid: o.token_ids for rid, o in plain.items()}
    assert want["t"][5] == 7 and 7 not in want["t"][:5]  # the budget forced it
    drafter = WatchingDrafter(want, VOCAB, acceptance=0.7)
    got, _ = serve(engine, [jobs], drafter, 3, **options)
    assert {rid: o.token_ids for rid, o in got.items()} == want
    assert all(s.num_accepted > 0 for s in drafter.seqs.values())
    ref, spec = (r.entries(want["p"]) for r in recorders)
    for (t, lp, top), (t2, lp2, top2) in zip(ref, spec, strict=True):
        assert t == t2 and abs(lp - lp2) < 1e-4 and [i for i, _ in top] == [i for i, _ in top2]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top, top2, strict=True))


@pytest.mark.parametrize("k", [1, 3])
def test_preempted_speculative_requests_equal_plain_decoding(engine: Engine, k: int) -> None:
    """24 blocks of 4 tokens for five requests of up to 41 tokens (drafts take slots too): requests are
    preempted, recomputed from the prefix cache and verify drafts again. One request is seeded and sampled."""
    params = [SamplingParams(max_tokens=16, ignore_eos=True)] * 4
    params.insert(2, SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, seed=3))
    jobs = [Job(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts(18, 22, 15, 25, 20, seed=10 + k), params))]
    want = plain_outputs(engine, jobs)
    drafter = WatchingDrafter(want, VOCAB, acceptance=0.8)
    got, aeng = serve(engine, [jobs], drafter, k, max_num_seqs=5, max_num_batched_tokens=64, cache_tokens=96,
                      block_size=4)
    assert {rid: o.token_ids for rid, o in got.items()} == want
    assert aeng.scheduler.num_preemptions > 0
    preempted = [s for s in drafter.seqs.values() if s.num_preemptions]
    assert preempted and sum(s.num_accepted for s in preempted) > 0


def test_prefix_hits_on_blocks_accepted_drafts_filled(engine: Engine) -> None:
    """A request decodes with K = 2; the next continues its conversation (its prompt, its first 13 output
    tokens, 3 more): it takes from the prefix cache the blocks whose latents verify rows wrote (accepted drafts
    among them), and a third request shares 17 tokens of the first prompt. All give plain decoding's tokens."""
    first, extra = prompts(21, 3, seed=3)
    a = Job("a", first, SamplingParams(max_tokens=20, ignore_eos=True))
    ref_a = plain_outputs(engine, [a])["a"]
    b = Job("b", first + ref_a[:13] + extra, SamplingParams(max_tokens=12, ignore_eos=True))
    c = Job("c", first[:17] + extra, SamplingParams(max_tokens=12, ignore_eos=True))
    want = plain_outputs(engine, [a, b, c])
    drafter = WatchingDrafter(want, VOCAB, acceptance=0.6)
    got, aeng = serve(engine, [[a], [b, c]], drafter, 2, max_num_seqs=4, cache_tokens=1024, block_size=4)
    assert {rid: o.token_ids for rid, o in got.items()} == want
    assert drafter.seqs["a"].num_accepted > 0
    assert got["b"].num_cached_tokens == 32  # 8 full blocks: 21 prompt tokens and 11 of a's decoded ones
    assert got["c"].num_cached_tokens == 16
    assert aeng.stats().prefix_hit_tokens == 48


def test_drafts_take_free_blocks_and_never_preempt() -> None:
    """A pool of 3 blocks of 4 tokens, two decoding sequences of 4 tokens (3 computed), one block free: drafts of 3
    tokens each. Their own tokens fit their blocks, so nobody is preempted (K = 0 would preempt nobody): the first
    one's drafts take the free block, the second verifies none. Then, with the second sequence at a block boundary,
    its token takes the free block before the first one's drafts can (its own drafts fill the rest of it)."""
    from deepseek_mcp.inference.engine.block_manager import BlockManager
    from deepseek_mcp.inference.engine.scheduler import Scheduler

    for b_prompt, want in (([4, 5, 6], [("a", 4), ("b", 1)]), ([4, 5, 6, 7], [("a", 1), ("b", 4)])):
        bm = BlockManager(3, 4)
        sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16)
        a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=10))
        b = Sequence("b", b_prompt, SamplingParams(max_tokens=10))
        sched.add(a)
        sched.add(b)
        sched.postprocess(sched.schedule(), [7, 8])  # both prefilled, one block each
        assert bm.num_free_blocks == 1
        a.draft_ids, b.draft_ids = [9, 9, 9], [9, 9, 9]
        out = sched.schedule()
        assert not out.preempted and sched.num_preemptions == 0, b_prompt
        assert [(s.request_id, len(row.token_ids)) for s, row in zip(out.seqs, out.scheduled)] == want, b_prompt
        assert [row.num_logits for row in out.scheduled] == [n for _, n in want]
        assert bm.num_free_blocks == 0
        sched.postprocess(out, [[9, 9, 9, 1] if n == 4 else [1] for _, n in want])
        for s in (a, b):
            sched.abort(s.request_id)
        bm.check(idle=True)


# ---------------------------------------------------------------------------------------------------------
# The MCP tools: stop strings, the thinking budget and a constrained tool call, K = 0 against K = 2


class RecordingEngine(AsyncEngine):
    """An AsyncEngine (K = 0) that keeps the longest output of each prompt: the continuations to replay."""

    def __init__(self, engine: Any, **options: Any) -> None:
        super().__init__(engine, **options)
        self.outputs: dict[str, list[int]] = {}

    def stream(self, prompt_ids: list[int], params: SamplingParams, **kw: Any) -> AsyncIterator[RequestOutput]:
        inner, key = super().stream(prompt_ids, params, **kw), prompt_key(prompt_ids)

        async def recorded() -> AsyncIterator[RequestOutput]:
            async with aclosing(inner):
                async for out in inner:
                    if len(out.token_ids) > len(self.outputs.get(key, [])):
                        self.outputs[key] = out.token_ids
                    yield out

        return recorded()


def prompt_key(prompt_ids: list[int]) -> str:
    return ",".join(map(str, prompt_ids))


class PromptReplayDrafter(WatchingDrafter):
    """Continuations keyed by prompt (the server names its own request ids), wrong where the ReplayDrafter is."""

    def propose(self, seq: Sequence, k: int) -> list[int]:
        key = prompt_key(seq.prompt_ids)
        self.seqs[key] = seq
        return ReplayDrafter.propose(self, SimpleNamespace(request_id=key, num_output_tokens=seq.num_output_tokens),
                                     k)


WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web", "inputSchema": {
    "type": "object", "properties": {"query": {"type": "string", "minLength": 2},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["query", "limit"]}}


def call_tools(demo: Engine, make_async_engine: Any, calls: list[tuple[str, dict[str, Any]]]) -> list[dict]:
    """The calls, in order, through an MCP client of one in-process server over `demo`; their structured results
    without the fields every call names afresh (conversation and tool-call ids)."""
    from mcp import Client

    from deepseek_mcp.mcp_server.config import Limits, SamplingDefaults, ServerConfig
    from deepseek_mcp.mcp_server.model_host import ModelHost
    from deepseek_mcp.mcp_server.server import build_server
    from deepseek_mcp.mcp_server.service import ChatService

    config = ServerConfig(cache_tokens=4096, max_num_seqs=4, sampling=SamplingDefaults(temperature=0.0),
                          limits=Limits(max_tokens=16))
    host = ModelHost(config, loader=lambda: demo, make_async_engine=make_async_engine)

    async def main() -> list[dict]:
        results = []
        async with host.running(), Client(build_server(ChatService(host, config))) as client:
            for name, args in calls:
                result = await client.call_tool(name, args)
                assert not result.is_error, result
                out = dict(result.structured_content)
                out.pop("conversation_id")
                for c in out.get("tool_calls", []):
                    c.pop("id")
                results.append(out)
            aeng = host.aengine
            assert not aeng.scheduler.running and not aeng.scheduler.waiting
            aeng.block_manager.check(idle=True)
        return results

    return anyio.run(main)


@pytest.fixture(scope="module")
def demo() -> Engine:
    """fp32. In bf16 a step that is not all single-token decodes (one with a verify row, or at K = 0 a decode beside
    a prefill chunk) runs MLA in another form than an all-decode step, and a position's attention output differs
    by one bf16 step; the demo's random weights have near-ties that close, so greedy tokens would flip."""
    return Engine.from_pretrained(None, device="cpu", dtype="float32")


def test_mcp_tools_under_speculation_equal_plain_decoding(demo: Engine) -> None:
    """The demo checkpoint (random weights, V3.1's vocabulary) behind the MCP tools, K = 2, drafts replaying the
    K = 0 server's outputs, right 70% of the time: a chat, the same chat cut by a stop string, a think whose
    budget forces </think>, and a required tool call at temperature 1 (the grammar's processor sees every
    verified position) return what K = 0 returns; the call's arguments validate."""
    options = dict(max_num_seqs=4, cache_tokens=4096)
    recorded: dict[str, list[int]] = {}

    def recording(engine: Engine) -> RecordingEngine:
        aeng = RecordingEngine(engine, **options)
        aeng.outputs = recorded
        return aeng

    chat = {"prompt": "Count to ten.", "max_tokens": 12}
    calls = [("chat", chat),
             ("think", {"prompt": "Why?", "max_tokens": 10, "thinking_budget": 4}),
             ("tool_call", {"prompt": "Weather in Paris, then search it.", "tools": [WEATHER, SEARCH],
                            "tool_choice": "required", "max_tokens": 40, "temperature": 1.0, "seed": 7})]
    plain = call_tools(demo, recording, calls)
    text = plain[0]["text"]
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    calls.append(("chat", {**chat, "stop": [stop]}))
    plain += call_tools(demo, recording, calls[-1:])
    assert plain[3]["finish_reason"] == "stop" and plain[3]["text"] == text[: text.index(stop)]
    assert plain[1]["reasoning_tokens"] == 4 and plain[1]["reasoning_complete"]
    assert plain[2]["tool_calls"] and not plain[2]["invalid_tool_calls"]

    drafter = PromptReplayDrafter(recorded, demo.config.vocab_size, acceptance=0.7)
    spec = call_tools(demo, lambda e: AsyncEngine(e, drafter=drafter, speculative_tokens=2, **options), calls)
    blocks = [r["usage"].pop("speculative") for r in spec]  # each result reports its drafts; plain ones none
    assert all(b is not None for b in blocks) and sum(b["draft_tokens"] for b in blocks) > 0
    assert all(r["usage"].get("speculative") is None for r in plain)
    for r in plain:
        r["usage"].pop("speculative", None)
    assert spec == plain
    schemas = {t["name"]: t["inputSchema"] for t in (WEATHER, SEARCH)}
    for c in spec[2]["tool_calls"]:
        jsonschema.validate(c["arguments"], schemas[c["name"]])
    assert len(drafter.seqs) == 3 and all(s.num_accepted > 0 for s in drafter.seqs.values())
    assert sum(s.num_drafted - s.num_accepted for s in drafter.seqs.values()) > 0


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism


def test_tensor_parallel_ranks_verify_like_one_process(engine: Engine, tiny_path: Path) -> None:
    """Two gloo ranks: rank 0 drafts, and the verify rows (several logits per row) reach rank 1 through the step
    codec. `Engine.generate` with K = 2 and the async engine with K = 3 (chunked prefills beside verify rows) give
    one process's K = 0 tokens."""
    seeded = SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, seed=9)
    jobs = [Job(str(i), p, sp, arrive) for i, (p, sp, arrive) in enumerate(zip(
        prompts(7, 26, 12, 3, seed=4), [SamplingParams(max_tokens=12, ignore_eos=True)] * 3 + [seeded], (0, 0, 1, 2),
        strict=True))]
    want = plain_outputs(engine, jobs)
    with Engine.from_pretrained(tiny_path, device="cpu", dtype="float32", tensor_parallel_size=2,
                                dist_timeout_s=60) as tp:
        drafter = WatchingDrafter(want, VOCAB, acceptance=0.7)
        got = tp.generate([j.prompt for j in jobs], [j.params for j in jobs], drafter=drafter, speculative_tokens=2)
        assert [o.token_ids for o in got] == [want[j.rid] for j in jobs]
        assert drafter.proposed > 0
        drafter = WatchingDrafter(want, VOCAB, acceptance=0.7)
        outs, _ = serve(tp, [jobs], drafter, 3, max_num_seqs=4, max_num_batched_tokens=12, cache_tokens=512,
                        block_size=4)
        assert {rid: o.token_ids for rid, o in outs.items()} == want
        assert drafter.accepted > 0
