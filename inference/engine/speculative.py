"""Speculative decoding: drafters propose the next tokens of a decoding sequence; one target forward scores the
last token and every draft; the tokens emitted are exactly those plain decoding would give.

Verification samples the target at each position in order, with the request's processors seeing the tokens
emitted before it, and emits that sample; it goes on to the next position only while the sample equals the
draft there (the next position's logits were computed with that draft as input). So every emitted token is a
draw of the target model given the tokens before it: greedy rows give the argmax, seeded rows the same draw as
plain decoding (a seeded draw depends only on the seed, the token's index and its logits, `sampling.sample`),
unseeded rows a fresh draw of the same distribution. A rejected draft costs its forward row and nothing else:
its cache slot is rolled back (the scheduler's `postprocess`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from deepseek_mcp.inference.engine.sequence import Sequence


class Drafter(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens to follow `seq.token_ids` (fewer, or none, when it has no guess)."""
        ...


def emitted_tokens(drafts: Seq[int], targets: Seq[int]) -> list[int]:
    """The tokens a verification emits when `targets[j]` is the target's sample at position j (after the last
    token and the first j drafts): targets up to and including the first that differs from its draft, all
    len(drafts) + 1 when every draft matched."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"{len(targets)} target samples for {len(drafts)} drafts (need one more)")
    for j, d in enumerate(drafts):
        if targets[j] != d:
            return list(targets[: j + 1])
    return list(targets)


@dataclass
class ReplayDrafter:
    """Drafts read from known continuations (e.g. a previous greedy run of the same requests, by request id),
    each draft wrong with probability `1 - acceptance` (a fixed hash of the request id and output position
    decides, so runs repeat): the verify path at a chosen acceptance rate, without a draft model (tests and
    bench/speculative.py)."""

    continuations: dict[str, list[int]]
    vocab_size: int
    acceptance: float = 1.0
    proposed: int = field(default=0, init=False)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        ref = self.continuations.get(seq.request_id)
        if ref is None:
            return []
        n = seq.num_output_tokens
        drafts = list(ref[n : n + k])
        for i, t in enumerate(drafts):
            if not self.right(seq.request_id, n + i):
                drafts[i] = (t + 1) % self.vocab_size
        self.proposed += len(drafts)
        return drafts

    def right(self, request_id: str, position: int) -> bool:
        h = hashlib.blake2b(f"{request_id}:{position}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < self.acceptance
