from __future__ import annotations

import math

import pytest
import torch
from reference.sampling import apply_top_k_top_p

from deepseek_mcp.inference.engine.sampling import (
    SamplingParams,
    StopChecker,
    draw_key,
    find_stop_string,
    sample,
)
from deepseek_mcp.inference.text.tokenizer import Tokenizer

# -- SamplingParams ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": -5}, "max_tokens must be an integer >= 1"),
        ({"seed": 2**64}, "seed must be None or an integer"),
        ({"seed": "7"}, "seed must be None or an integer"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids must hold integers >= 0, got -2"),
        ({"stop": ("ok", "")}, "stop strings must be non-empty strings"),
    ],
)
def test_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_types_and_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.0, 1.0, 0, None, 256)
    assert p.greedy and p.stop == () and p.stop_token_ids == () and not p.ignore_eos
    q = SamplingParams(stop=["a", "b"], stop_token_ids=[5, 6])  # lists from callers become tuples
    assert q.stop == ("a", "b") and q.stop_token_ids == (5, 6) and hash(q) == hash(q)
    assert SamplingParams(stop="END").stop == ("END",)
    with pytest.raises(TypeError, match="temperature must be a number"):
        SamplingParams(temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ignore_eos must be a bool"):
        SamplingParams(ignore_eos=1)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    assert draw_key(11, 3) == draw_key(11, 3) and len({draw_key(11, i) for i in range(100)}) == 100
    assert draw_key(-1, 0) == draw_key(2**64 - 1, 0) != draw_key(0, 0)  # a seed is its 64 bits


# -- sample ------------------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 1000) * 3
    params = [SamplingParams(), SamplingParams(top_k=5, top_p=0.3), SamplingParams(seed=1)] * 2
    out = sample(logits, params, [0] * 6)
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        sample(torch.randn(10), [SamplingParams()], [0])
    with pytest.raises(ValueError, match="one SamplingParams and one token index per row: 2 rows, 1 params"):
        sample(torch.randn(2, 10), [SamplingParams()], [0])


def _run_seeded(row_logits: torch.Tensor, params: SamplingParams, batch_with: list[SamplingParams],
                position: int, steps: int) -> list[int]:
    """Sample `steps` tokens for one seeded request placed at `position` among unrelated requests."""
    batch = list(batch_with)
    batch.insert(position, params)
    out = []
    for n in range(steps):
        others = torch.randn(len(batch), row_logits.shape[-1])
        others[position] = row_logits
        index = [n + 3 * j for j in range(len(batch))]  # the other rows are at other tokens of theirs
        index[position] = n
        out.append(int(sample(others, batch, index)[position]))
    return out


def test_seed_reproducible_and_independent_of_batch() -> None:
    logits = torch.randn(500)  # flat-ish distribution: many tokens likely
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = _run_seeded(logits, p, [], 0, 30)
    others = [SamplingParams(temperature=0.8, seed=7), SamplingParams(), SamplingParams(temperature=1.2)]
    assert _run_seeded(logits, p, others, 2, 30) == alone
    assert _run_seeded(logits, p, others[:1], 1, 30) == alone
    assert len(set(alone)) > 5  # really sampling, not greedy
    different = _run_seeded(logits, SamplingParams(temperature=1.0, top_p=0.95, seed=4321), [], 0, 30)
    assert different != alone


def test_seeded_rows_independent_of_batch_with_tied_logits() -> None:
    """bf16 logits tie a lot; a row's tokens must not change with what the other rows force (top-k list,
    short nucleus list or full sort)."""
    logits = (torch.randn(2000) * 2).bfloat16().float()
    p = SamplingParams(temperature=1.0, top_k=60, top_p=0.9, seed=77)
    alone = _run_seeded(logits, p, [], 0, 25)
    assert len(set(alone)) > 3
    assert _run_seeded(logits, p, [SamplingParams(temperature=1.0)], 0, 25) == alone  # full sort
    assert _run_seeded(logits, p, [SamplingParams(temperature=0.5, top_p=0.5)], 1, 25) == alone  # short list
    assert _run_seeded(logits, p, [SamplingParams(temperature=0.5, top_k=500)], 1, 25) == alone  # longer top-k


def test_unseeded_rows_sample() -> None:
    logits = torch.zeros(3, 50)
    params = [SamplingParams(temperature=1.0)] * 3
    draws = torch.stack([sample(logits, params, [0] * 3) for _ in range(20)])  # [20, 3]
    assert draws.unique().numel() > 10 and int(draws.min()) >= 0 and int(draws.max()) < 50


def test_top_k_keeps_exactly_k() -> None:
    vocab = 300
    logits = torch.randn(5, vocab)
    logits[4] = torch.randint(0, 3, (vocab,)).float()  # heavy ties: still exactly k
    top_k = torch.tensor([1, 7, 0, vocab + 10, 50])
    masked = apply_top_k_top_p(logits, top_k, torch.ones(5))
    kept = torch.isfinite(masked).sum(dim=-1).tolist()
    assert kept == [1, 7, vocab, vocab, 50]
    for row in (0, 1, 4):
        keep = torch.isfinite(masked[row])
        assert float(logits[row][keep].min()) >= float(logits[row][~keep].max())  # the k largest
        assert torch.equal(masked[row][keep], logits[row][keep])  # survivors unchanged
    assert torch.equal(masked[2], logits[2])
    # among equal logits the lower ids win
    tied = torch.isfinite(masked[4]) & (logits[4] == logits[4][torch.isfinite(masked[4])].min())
    ids_at_threshold = (logits[4] == logits[4][tied][0]).nonzero().flatten()
    assert tied.nonzero().flatten().tolist() == ids_at_threshold[: int(tied.sum())].tolist()
    flat = apply_top_k_top_p(torch.zeros(2, 10), torch.tensor([3, 0]), torch.tensor([1.0, 0.35]))
    assert torch.isfinite(flat).tolist() == [[True] * 3 + [False] * 7, [True] * 4 + [False] * 6]


def _reference_mask(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Straightforward float64 top-k then top-p over one row: the kept ids."""
    values = row.double().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if 0 < k < len(values):
        order = order[:k]
    weights = [math.exp(values[i] - values[order[0]]) for i in order]
    total = sum(weights) if 0 < k < len(values) else sum(math.exp(v - values[order[0]]) for v in values)
    kept, mass = set(), 0.0
    for i, w in zip(order, weights, strict=True):
        if kept and p < 1.0 and mass >= p:
            break
        kept.add(i)
        mass += w / total
    return kept


@pytest.mark.parametrize("vocab", [50, 3000])
def test_masks_match_reference_and_are_batch_independent(vocab: int) -> None:
    """Random rows mixing top-k / top-p / neither; 3000 > the short candidate list, so top-p rows without
    top-k exercise both the short list and the full-sort fallback (flat rows need most of the vocab)."""
    rows = 8
    logits = torch.randn(rows, vocab) * torch.tensor([3.0, 0.05, 1.0, 2.0, 0.01, 4.0, 1.0, 0.5])[:, None]
    top_k = torch.tensor([0, 0, 5, 0, 0, 40, 1, 0])
    top_p = torch.tensor([0.9, 0.95, 0.8, 1.0, 0.5, 0.3, 0.9, 0.7])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    for r in range(rows):
        kept = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert kept == _reference_mask(logits[r], int(top_k[r]), float(top_p[r])), r
        alone = apply_top_k_top_p(logits[r : r + 1], top_k[r : r + 1], top_p[r : r + 1])
        assert torch.equal(alone[0], masked[r])


def _keep_set(probs: list[float], top_p: float, top_k: int = 0, perm: torch.Tensor | None = None) -> set[int]:
    p = torch.tensor(probs, dtype=torch.float64)
    perm = torch.randperm(len(probs)) if perm is None else perm  # put tokens at random vocab positions
    logits = torch.empty(len(probs))
    logits[perm] = p.log().float()
    masked = apply_top_k_top_p(logits[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]
    kept_positions = torch.isfinite(masked).nonzero().flatten().tolist()
    inverse = {int(pos): i for i, pos in enumerate(perm)}
    return {inverse[pos] for pos in kept_positions}


def test_top_p_minimal_nucleus() -> None:
    dist = [0.5, 0.25, 0.125, 5 / 64, 3 / 64]  # exact in binary: boundaries are unambiguous
    assert _keep_set(dist, 0.5) == {0}
    assert _keep_set(dist, 0.50001) == {0, 1}
    assert _keep_set(dist, 0.75) == {0, 1}
    assert _keep_set(dist, 0.8) == {0, 1, 2}
    assert _keep_set(dist, 0.875) == {0, 1, 2}
    assert _keep_set(dist, 0.9) == {0, 1, 2, 3}
    assert _keep_set(dist, 0.953125) == {0, 1, 2, 3}
    assert _keep_set(dist, 0.96) == {0, 1, 2, 3, 4}
    assert _keep_set(dist, 1.0) == {0, 1, 2, 3, 4}
    assert _keep_set(dist, 0.01) == {0}  # the best token always survives
    # top-k first, then the nucleus of the renormalized survivors: 0.5, 0.25 -> 2/3, 1/3
    assert _keep_set(dist, 0.6, top_k=2) == {0}
    assert _keep_set(dist, 0.7, top_k=2) == {0, 1}
    assert _keep_set(dist, 0.99, top_k=3) == {0, 1, 2}


def test_top_p_rows_are_independent() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]]))
    masked = apply_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([0.7, 1.0]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False], [True, True, True, True]]


def test_masked_tokens_never_sampled() -> None:
    logits = torch.randn(1, 100)
    params = [SamplingParams(temperature=2.0, top_k=3, seed=5)]
    allowed = set(logits[0].topk(3).indices.tolist())
    draws = {int(sample(logits, params, [n])[0]) for n in range(300)}
    assert draws == allowed
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=6)]
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    draws = {int(sample(logits, params, [n])[0]) for n in range(300)}
    assert draws == {1, 3}  # 0.4 + 0.3 >= 0.5 while 0.4 alone is not


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_distribution(temperature: float) -> None:
    """Chi-square goodness of fit against softmax(logits / T) (fixed seed; bound ~ p < 1e-4 for 7 dof)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.5])
    n = 20000
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    params = [SamplingParams(temperature=temperature)] * n
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        draws = sample(logits.expand(n, -1).contiguous(), params, [0] * n)
    counts = torch.bincount(draws, minlength=8).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts.tolist(), expected.tolist())
    # a wrong temperature would be caught: same counts against T * 1.5 are far off
    wrong = torch.softmax(logits.double() / (temperature * 1.5), dim=0) * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 100.0


def test_seeded_draws_distribution() -> None:
    """One seeded request's successive tokens (token index 0, 1, ...) follow softmax(logits)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, seed=99)]
    n = 3000
    counts = torch.bincount(torch.cat([sample(logits, params, [i]) for i in range(n)]), minlength=4).double()
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64) * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 25.0


# -- stop detection -----------------------------------------------------------------------------------------


class PieceDecoder:
    """Test decoder: each id maps to a fixed string piece."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def step(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return ""


PIECES = {1: "<eos>", 2: "Hel", 3: "lo", 4: " wo", 5: "rld", 6: "!", 7: " ST", 8: "OP", 9: " more", 10: "S"}


def _run(params: SamplingParams, ids: list[int], eos_id: int | None = 1) -> tuple[StopChecker, list[str]]:
    checker = StopChecker(params, eos_id, PieceDecoder(PIECES))
    deltas = []
    for i in ids:
        update = checker.step(i)
        deltas.append(update.text_delta)
        if update.finished:
            break
    return checker, deltas


def test_stop_string_split_across_tokens() -> None:
    params = SamplingParams(stop=("STOP", "zzz"))
    checker, deltas = _run(params, [2, 3, 4, 5, 7, 8, 9, 6])
    assert checker.finish_reason == "stop" and checker.matched == "STOP"
    assert checker.text == "Hello world " and "".join(deltas) == checker.text
    assert checker.token_ids == [2, 3, 4, 5, 7, 8]  # stops on the token that completes the match
    # streamed text never ran ahead into what turned out to be the stop string
    assert "S" not in "".join(deltas[:-1])


def test_holdback_released_when_not_a_stop() -> None:
    params = SamplingParams(stop=("STOP",), max_tokens=7)
    checker, deltas = _run(params, [2, 3, 7, 6, 10, 6, 9])  # "Hello ST!S! more": ST/S never complete STOP
    assert checker.finish_reason == "length" and checker.matched is None
    assert checker.text == "Hello ST!S! more" == "".join(deltas)
    assert deltas[:3] == ["", "He", "llo"]  # the last 3 chars are held back: they might start "STOP"


def test_eos_stop_tokens_and_length() -> None:
    checker, deltas = _run(SamplingParams(), [2, 3, 1, 4])
    assert (checker.finish_reason, checker.matched, checker.text) == ("stop", 1, "Hello")  # EOS text dropped
    assert checker.token_ids == [2, 3, 1] and "".join(deltas) == "Hello"
    checker, _ = _run(SamplingParams(ignore_eos=True, max_tokens=4), [2, 1, 3, 4, 5])
    assert (checker.finish_reason, checker.text) == ("length", "Hel<eos>lo wo")
    checker, _ = _run(SamplingParams(stop_token_ids=(6,)), [2, 3, 6, 9])
    assert (checker.finish_reason, checker.matched, checker.text) == ("stop", 6, "Hello")
    checker, _ = _run(SamplingParams(ignore_eos=True, stop_token_ids=(1,)), [2, 1])
    assert checker.finish_reason == "stop"  # an explicit stop id wins over ignore_eos
    checker, _ = _run(SamplingParams(max_tokens=2), [2, 3, 4])
    assert (checker.finish_reason, checker.text, checker.token_ids) == ("length", "Hello", [2, 3])
    checker, _ = _run(SamplingParams(max_tokens=3, stop=("lo w",)), [2, 3, 4])
    assert checker.finish_reason == "stop" and checker.text == "Hel"  # a stop string beats length
    with pytest.raises(RuntimeError, match="after the request finished"):
        checker.step(5)


def test_stop_string_with_real_tokenizer() -> None:
    tok = Tokenizer.default()
    text = "答案是：42。然后我们继续 🤖 讨论"
    ids = tok.encode(text)
    stop = "继续 🤖"  # spans several tokens, including the robot's byte pieces
    checker = StopChecker(SamplingParams(stop=(stop,)), tok.eos_id, tok.incremental_decoder())
    deltas = []
    for i in ids:
        update = checker.step(i)
        deltas.append(update.text_delta)
        if update.finished:
            break
    assert checker.finish_reason == "stop" and checker.text == "答案是：42。然后我们" == "".join(deltas)
    assert len(checker.token_ids) < len(ids)


def test_find_stop_string_earliest_match() -> None:
    assert find_stop_string("xxABCyyAB", ("yy", "AB")) == (2, "AB")
    assert find_stop_string("xxABC", ("BC",), start=4) == (3, "BC")  # overlap with old text is searched
    assert find_stop_string("xxABC", ("AB",), start=4) is None  # fully inside already-scanned text
    assert find_stop_string("", ("a",)) is None


def test_no_nan_or_masked_pick_with_extreme_logits() -> None:
    logits = torch.full((4, 64), -1e30)
    logits[:, 10] = 0.0
    logits[:, 20] = float("-inf")
    params = [SamplingParams(temperature=0.01, seed=s) for s in range(4)]
    out = sample(logits, params, [0] * 4)
    assert out.tolist() == [10, 10, 10, 10]
    assert not math.isnan(float(apply_top_k_top_p(logits, torch.tensor([2] * 4), torch.full((4,), 0.9)).max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_draw_as_on_the_cpu() -> None:
    logits = torch.randn(3, 4096, device="cuda")
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=50, seed=3),
              SamplingParams(temperature=0.7, top_p=0.9, seed=4)]
    first = sample(logits, params, [0, 5, 9])
    again = sample(logits, params, [0, 5, 9])
    assert torch.equal(first.cpu(), sample(logits.cpu(), params, [0, 5, 9]))  # the same noise on both
    assert first.device.type == "cuda" and torch.equal(first, again)
    assert int(first[0]) == int(logits[0].argmax())
    assert int(first[1]) in set(logits[1].topk(50).indices.tolist())
