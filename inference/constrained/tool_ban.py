"""The one tool-call ban (tool_choice "none"): the tool-call and tool-output control tokens never appear, and,
given the vocabulary's token bytes, neither does their spelled-out text (`<｜`, the prefix of every DeepSeek
control marker). Needs no grammar engine, so it also serves where xgrammar is unavailable or turned off."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from deepseek_mcp.inference.text.control import TOOL_CALL_MARKERS, TOOL_OUTPUT_MARKERS

MARKER_PREFIX = "<｜".encode()  # every DeepSeek control marker starts with these bytes
_NEG_INF = float("-inf")


def marker_ban(raw: Sequence[bytes]) -> tuple[torch.Tensor, ...]:
    """ban[k]: ids whose bytes, appended to text ending in MARKER_PREFIX[:k], would spell the marker prefix.
    ban[0] holds the ids that contain it whole."""
    m = MARKER_PREFIX
    out = [[i for i, b in enumerate(raw) if m in b]]
    for k in range(1, len(m)):
        rest = m[k:]
        out.append([i for i, b in enumerate(raw) if b.startswith(rest) or (b and rest.startswith(b))])
    return tuple(torch.tensor(ids, dtype=torch.long) for ids in out)


def marker_tail(tail: int, data: bytes) -> int:
    """How much of MARKER_PREFIX the text ends with (0..3) after appending `data` to text ending in `tail`."""
    buf = MARKER_PREFIX[:tail] + data
    for k in range(len(MARKER_PREFIX) - 1, 0, -1):
        if buf.endswith(MARKER_PREFIX[:k]):
            return k
    return 0


def ban_ids(logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Set logits[ids] to -inf, unless that would leave nothing to sample."""
    if not ids.numel():
        return
    ids = ids.to(logits.device)
    saved = logits[ids]  # [n] (a copy)
    if not bool(torch.isfinite(saved).any()):
        return  # already masked: the common case, no full-row check needed
    logits[ids] = _NEG_INF
    if float(logits.max()) == _NEG_INF:
        logits[ids] = saved


def ban_marker(logits: torch.Tensor, bans: Sequence[torch.Tensor], tail: int) -> None:
    """Forbid tokens that would spell `<｜` as text after a text ending in MARKER_PREFIX[:tail]."""
    for k in {0, tail}:
        ban_ids(logits, bans[k])


class ToolBan:
    """Never sample `token_ids`; with `token_bytes` and `marker_bans` (see `marker_ban`), never spell a control
    marker as text either."""

    def __init__(self, token_ids: Iterable[int], token_bytes: Sequence[bytes] | None = None,
                 marker_bans: Sequence[torch.Tensor] | None = None) -> None:
        self.token_ids = sorted(set(token_ids))
        self._ids = torch.tensor(self.token_ids, dtype=torch.long)
        self._bytes, self._bans = token_bytes, marker_bans
        self._tail = 0
        self._seen = 0
        self.steered = False
        self.is_terminated = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ToolBan:
        """The control tokens only (no vocabulary tables: cheap to build per request)."""
        ids = (tokenizer.token_to_id(t) for t in (*TOOL_CALL_MARKERS, *TOOL_OUTPUT_MARKERS))
        return cls(i for i in ids if i is not None)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._ids.numel():
            logits[self._ids.to(logits.device)] = _NEG_INF  # logits: [V]
        if self._bytes is not None and self._bans is not None:
            for t in output_ids[self._seen:]:
                self._tail = marker_tail(self._tail, self._bytes[t])
            self._seen = len(output_ids)
            ban_marker(logits, self._bans, self._tail)
        return logits
