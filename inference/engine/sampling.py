"""Sampling parameters, batched token sampling and stop detection.

`sample` handles a batch of rows with different parameters: greedy rows take the argmax; the rest are divided
by their temperature, filtered by top-k / top-p (one `topk` or one sort for the whole batch, per-row k and p
as tensors) and drawn by the Gumbel-max trick: the token is the argmax of `logits / T + g` over the candidates,
with standard Gumbel noise `g` for each vocabulary id. A seeded row's noise is a pure function of (seed, token
index, vocabulary id), a counter-based hash computed on the device (`gumbel_noise`): its tokens depend on
nothing but its own seed and logits, never on the batch, the chunking of its prompt or a prefix-cache hit. And
since only the winner of a perturbed argmax counts, a last-bit change of the logits (another batch shape,
another attention path over a cached prefix) moves a sampled token about as rarely as a greedy one; an
inverse-CDF draw over the cumulative probabilities would move whenever the shift crossed the draw's bin edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # the signed and unsigned 64-bit ranges
_M32, _M64 = 2**32 - 1, 2**64 - 1
_NUCLEUS_CANDIDATES = (1024, 16384)  # top-p without top-k tries these short lists before a full sort


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the output text ends just before the first one found
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and a single stop string) from callers, store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                if not isinstance(value, (list, frozenset, set)):
                    raise TypeError(f"{name} must be a tuple or list, got {type(value).__name__}")
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for tid in self.stop_token_ids:
            if not _is_int(tid) or tid < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {tid!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def to_device(values: Sequence[int] | Sequence[float] | torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Small host data on the device without waiting for it: pinned and copied asynchronously on CUDA
    (`torch.tensor(..., device=cuda)` copies from pageable memory and synchronizes the stream)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------
# Counter-based noise: the same (seed, token index, vocabulary id) gives the same draw on every batch


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def draw_key(seed: int, token_index: int) -> int:
    """The 64-bit key of a seeded request's draw of its `token_index`-th generated token (host arithmetic)."""
    return _splitmix64(_splitmix64(seed & _M64) ^ token_index)


def draw_keys(seeds: Sequence[int | None], token_index: Sequence[int]) -> torch.Tensor:
    """[R, 2] int32 on the host: each row's key as two 32-bit words (their bits held in int32). Unseeded rows
    take a fresh key from torch's global generator (so `torch.manual_seed` makes them repeat)."""
    words: list[int] = []
    for seed, n in zip(seeds, token_index, strict=True):
        key = 0 if seed is None else draw_key(seed, n)
        words += (key & _M32, key >> 32)
    keys = torch.tensor([(w ^ 0x80000000) - 0x80000000 for w in words], dtype=torch.int32).view(-1, 2)  # [R, 2]
    unseeded = [i for i, seed in enumerate(seeds) if seed is None]
    if unseeded:
        keys[unseeded] = torch.randint(-(2**31), 2**31, (len(unseeded), 2), dtype=torch.int32)
    return keys


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash, a bijection of 32-bit words, on int32 tensors holding the words'
    bits (multiplications wrap modulo 2**32; right shifts masked to be logical)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)
    return x ^ ((x >> 16) & 0xFFFF)


def gumbel_noise(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of each (row key, vocabulary id): keys [R, 2] int32, ids [R, K] or [K] -> [R, K]
    float32. Two hash rounds (one per key word) give a 32-bit word u per entry; g = -log(-log(u)) with u in
    (0, 1) (g from about -3.1 to 22.9). Pure tensor arithmetic: no generator state, no host read."""
    x = _lowbias32(ids.to(torch.int32) ^ keys[:, :1])  # [R, K]
    x = _lowbias32(x ^ keys[:, 1:])  # [R, K]
    u = (x.double() + (2**31 + 0.5)) * 2.0**-32  # [R, K] in (0, 1)
    return (-torch.log(-torch.log(u))).float()


# ---------------------------------------------------------------------------------------------------------
# Sampling


def _rank_keys(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, V] int64 keys ordered by (value desc, id asc): the order-preserving int image of the float32
    value, then the inverted id. No ties, so `topk` and a full sort agree exactly, whatever n the rest of the
    batch asks for."""
    vocab = logits.shape[1]
    bits = logits.float().contiguous().view(torch.int32)  # [B, V]
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # [B, V] monotone in the float value
    return (ordered << 32) | (vocab - 1 - torch.arange(vocab, device=logits.device))  # [B, V] unique per row


def _top_candidates(logits: torch.Tensor, keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best entries of each row by `keys` (from _rank_keys): (values [B, n], ids [B, n])."""
    vocab = logits.shape[1]
    top = keys.topk(n, dim=-1).values if n < vocab else keys.sort(dim=-1, descending=True).values  # [B, n]
    ids = (vocab - 1) - (top & 0xFFFFFFFF)  # [B, n]
    return logits.gather(1, ids), ids


def _candidates(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor | None = None,
    host: tuple[Sequence[int], Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates, best first: (values [B, K] with filtered entries at -inf, vocab ids [B, K]).

    `temperature` [B], if given, divides the values (the ranking does not change with it; top-p does).
    K is the largest top-k when every row has one; otherwise the shortest of `_NUCLEUS_CANDIDATES` that
    covers every row's top-k and top-p nucleus, else V (a full sort). `host` = the same top-k / top-p as host
    lists: then no decision reads the device (no sync), and a top-p row without top-k sorts its whole row
    instead of trying short lists.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    top_k = top_k.to(device=device, dtype=torch.long)
    top_p = top_p.to(device=device, dtype=torch.float32)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [B]
    has_k = k < vocab  # [B]
    use_p = top_p < 1.0  # [B]
    row_lse: torch.Tensor | None = None  # [B] whole-row normalizer, for top-p rows without top-k
    if host is not None:
        ks = [n if 0 < n < vocab else vocab for n in host[0]]
        all_k, any_p = all(n < vocab for n in ks), any(p < 1.0 for p in host[1])
        sizes = [max(ks, default=vocab)] if all_k else [vocab]
    else:
        all_k, any_p = not num_rows or bool(has_k.all()), None
    if host is None and all_k:
        sizes = [int(k.max()) if num_rows else vocab]
    elif host is None:
        row_lse = (logits if temperature is None else logits / temperature[:, None]).logsumexp(dim=-1)
        sizes = [vocab]
        if not bool((~has_k & ~use_p).any()):  # every row without top-k has a nucleus: try short lists
            longest_k = int(k.masked_fill(~has_k, 0).max())
            sizes = [n for n in _NUCLEUS_CANDIDATES if longest_k <= n < vocab] + [vocab]
    keys = _rank_keys(logits)  # [B, V]
    for n in sizes:
        values, ids = _top_candidates(logits, keys, n)  # [B, n] each
        if temperature is not None:
            values = values / temperature[:, None]
        ranks = torch.arange(n, device=device)  # [n]
        values = values.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))  # exactly k per row survive
        if not (bool(use_p.any()) if any_p is None else any_p):
            return values, ids
        lse = values.logsumexp(dim=-1)  # [B] over the top-k survivors
        if row_lse is not None:
            lse = torch.where(has_k, lse, row_lse)
        probs = (values - lse[:, None]).exp()  # [B, n]
        if n < vocab and host is None and not bool((has_k | (probs.sum(dim=-1) >= top_p)).all()):
            continue  # some nucleus reaches past the first n candidates
        mass_before = probs.cumsum(dim=-1) - probs  # [B, n] probability of strictly better candidates
        drop = (mass_before >= top_p[:, None]) & use_p[:, None]
        drop[:, 0] = False  # the best token always survives
        return values.masked_fill(drop, float("-inf")), ids
    raise AssertionError("unreachable: the last candidate list is the whole vocabulary")


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_index: Sequence[int],
    sync_free: bool | None = None,
) -> torch.Tensor:
    """Draw one token per row. logits [B, V] float32; returns [B] int64 on logits' device.

    token_index[b]: how many tokens row b's request generated before this one. A seeded row's draw depends on
    (seed, token_index, its logits) only. sync_free (default: on any device but the CPU, where a device read
    costs nothing): every decision comes from the host-side params, so nothing waits for the device until the
    caller reads the tokens."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    if len(params) != num_rows or len(token_index) != num_rows:
        raise ValueError(f"need one SamplingParams and one token index per row: {num_rows} rows, "
                         f"{len(params)} params, {len(token_index)} token indices")
    logits = logits.float()
    if sync_free is None:
        sync_free = logits.device.type != "cpu"
    out = logits.argmax(dim=-1)  # [B]; final for greedy rows
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    device = logits.device
    row_idx = to_device(rows, device, torch.long)  # [R]
    temps = to_device([params[i].temperature for i in rows], device, torch.float32)  # [R]
    x = logits if len(rows) == num_rows else logits[row_idx]  # [R, V]
    ids: torch.Tensor | None = None
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
        top_k = to_device([params[i].top_k for i in rows], device, torch.long)
        top_p = to_device([params[i].top_p for i in rows], device, torch.float32)
        host = ([params[i].top_k for i in rows], [params[i].top_p for i in rows]) if sync_free else None
        x, ids = _candidates(x, top_k, top_p, temps, host)  # [R, K] each, filtered entries at -inf
    else:
        x = x / temps[:, None]
    keys = to_device(draw_keys([params[i].seed for i in rows], [token_index[i] for i in rows]), device)  # [R, 2]
    vocab_ids = ids if ids is not None else torch.arange(vocab, device=device)  # [R, K] or [V]
    choice = (x + gumbel_noise(keys, vocab_ids)).argmax(dim=-1)  # [R] Gumbel-max: a draw from softmax(x)
    out[row_idx] = choice if ids is None else ids.gather(1, choice[:, None]).squeeze(1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Stop detection


def find_stop_string(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in text that ends after `start`'s search window begins:
    returns (index, stop string) or None. Searching from `start` lets callers scan only new text (plus
    the overlap a stop string split across deltas needs)."""
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s, max(0, start - len(s) + 1))
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


class TextDecoder(Protocol):
    """What StopChecker needs from a streaming detokenizer (inference.text.tokenizer.IncrementalDecoder)."""

    def step(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(frozen=True)
class StopUpdate:
    text_delta: str  # text now safe to stream (held back while it could still begin a stop string)
    finish_reason: str | None  # None while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Per-request detokenize-and-stop state for streaming.

    `step(token_id)` decodes the token, checks EOS / stop_token_ids / stop strings / max_tokens and returns
    the text delta that is safe to emit: while stop strings are set, the last len(longest)-1 characters are
    held back because they could be the start of a stop string completed by a later token. The text of a
    stop token (e.g. EOS) is not part of the output. Concatenated deltas equal `.text` at the end.
    """

    def __init__(self, params: SamplingParams, eos_id: int | None, decoder: TextDecoder) -> None:
        self.params = params
        self.eos_id = eos_id
        self._decoder = decoder
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # all text so far (emitted + held back); the final output once finished
        self._emitted = 0  # len of the prefix of self.text already returned
        self.finish_reason: str | None = None
        self.matched: int | str | None = None

    def step(self, token_id: int) -> StopUpdate:
        if self.finish_reason is not None:
            raise RuntimeError("StopChecker.step called after the request finished")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        params = self.params
        if token_id in params.stop_token_ids or (token_id == self.eos_id and not params.ignore_eos):
            # Only flush what an incomplete character held back: the stop token's own text is dropped.
            self.text += self._decoder.flush()
            return self._finish(FINISH_STOP, token_id)
        scan_from = len(self.text)
        self.text += self._decoder.step(token_id)
        at_length = len(self.token_ids) >= params.max_tokens
        if at_length:
            self.text += self._decoder.flush()  # an incomplete last character becomes U+FFFD, as in decode
        if params.stop:
            found = find_stop_string(self.text, params.stop, scan_from)
            if found is not None:
                self.text = self.text[: found[0]]
                return self._finish(FINISH_STOP, found[1])
        if at_length:
            return self._finish(FINISH_LENGTH, None)
        safe = max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted:safe]
        self._emitted = safe
        return StopUpdate(delta, None)

    def _finish(self, reason: str, matched: int | str | None) -> StopUpdate:
        self.finish_reason = reason
        self.matched = matched
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return StopUpdate(delta, reason)
