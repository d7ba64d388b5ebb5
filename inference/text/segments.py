"""A rendered prompt as (text, is_control) segments, and its encoding to ids.

Only the template's own structure is control: BOS, `<｜User｜>`, `<｜Assistant｜>`, `<think>`, the tool-call and
tool-output markers, EOS, and the markers the tools block's format rules print. Everything a caller sent (every
message's content, tool results, tool names and arguments, tool descriptions and schemas) is text, and text is
encoded with the added-token matching off: a spelled `<｜end▁of▁sentence｜>` in a fetched web page stays the 23
characters it is, so content can never end a turn, forge an assistant turn or plant a tool call.

`trusted=True` restores what the official template plus the tokenizer do (the whole string encoded at once,
control-token text anywhere becomes control), for callers that build prompts from text they control.

`max_tokens` bounds the work: encoding stops with `PromptTooLong` once the ids certainly pass it, so a prompt far
past the context costs a few pieces of encoding, not all of it (bounded.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from itertools import groupby
from operator import itemgetter
from typing import Protocol

from deepseek_mcp.inference.text.bounded import PromptTooLong
from deepseek_mcp.inference.text.control import BOS, V31_SPECIAL_TOKENS

Segment = tuple[str, bool]  # (text, is_control)

# Longest first, so no marker is cut by a shorter one that is its prefix.
_CONTROL_TEXT = re.compile("|".join(re.escape(t) for t in sorted(V31_SPECIAL_TOKENS.values(), key=len,
                                                                     reverse=True)))


class TokenEncoder(Protocol):
    """The part of `inference.text.tokenizer.Tokenizer` that prompt encoding needs."""

    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str, limit: int | None = None) -> list[int]: ...

    def encode_text(self, text: str, limit: int | None = None) -> list[int]: ...


class Parts:
    """Builds a prompt's segments: `text` for what the caller sent, `control` for template structure,
    `template` for the template's own prose (its control-token spellings become control)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def text(self, s: str) -> None:
        if s:
            self.segments.append((s, False))

    def control(self, s: str) -> None:
        self.segments.append((s, True))

    def template(self, s: str) -> None:
        self.segments.extend(template_segments(s))

    def extend(self, segments: Iterable[Segment]) -> None:
        self.segments.extend(segments)

    def drop_last(self, s: str) -> None:
        """Remove a trailing control segment `s` (continue_final_message drops the closing EOS)."""
        if self.segments and self.segments[-1] == (s, True):
            self.segments.pop()

    def __str__(self) -> str:
        return "".join(s for s, _ in self.segments)


def template_segments(s: str) -> list[Segment]:
    """The template's own text split at the control tokens it spells (trusted text only)."""
    out: list[Segment] = []
    at = 0
    for m in _CONTROL_TEXT.finditer(s):
        if m.start() > at:
            out.append((s[at:m.start()], False))
        out.append((m.group(), True))
        at = m.end()
    if at < len(s):
        out.append((s[at:], False))
    return out


def encode_segments(segments: Iterable[Segment], tokenizer: TokenEncoder, *, trusted: bool = False,
                    max_tokens: int | None = None) -> list[int]:
    """Ids of the segments; starts with the BOS id (RuntimeError otherwise, or if encoding added a BOS).

    Untrusted (the default): control segments are encoded as control tokens, text segments (adjacent ones
    merged) with `encode_text`, which never yields an added token. Control tokens split the official encoding
    at the same places, so for content that spells no control token the ids equal `tokenizer.encode` of the
    joined string. `trusted`: `tokenizer.encode` of the joined string (today's official behaviour).
    `max_tokens`: PromptTooLong as soon as there are certainly more ids than that (the rest is not encoded).
    """
    joined = (("".join(s for s, _ in group), is_control) for is_control, group in groupby(segments, itemgetter(1)))
    runs = [(s, is_control) for s, is_control in joined if s]
    control_ids: set[int] = set()
    text_ids: list[int] = []
    ids: list[int] = []

    def encode(fn: Callable[..., list[int]], s: str) -> list[int]:
        if max_tokens is None:
            return list(fn(s))
        try:
            return list(fn(s, limit=max_tokens - len(ids)))
        except PromptTooLong as e:
            raise PromptTooLong(len(ids) + e.num_tokens, max_tokens) from None

    if trusted:
        text = "".join(s for s, _ in runs)
        ids = encode(tokenizer.encode, text)
        num_bos = text.count(BOS)
    else:
        plain = getattr(tokenizer, "encode_text", None)  # a test double without it is checked below instead
        for s, is_control in runs:
            part = encode(tokenizer.encode if is_control or plain is None else plain, s)
            if is_control:
                control_ids.update(part)
            else:
                text_ids.extend(part)
            ids.extend(part)
        num_bos = sum(s.count(BOS) for s, is_control in runs if is_control)
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(len(ids), max_tokens)
    bos_id = tokenizer.bos_id
    if bos_id is None or not ids or ids[0] != bos_id:
        raise RuntimeError(f"rendered prompt does not start with BOS id {bos_id}: tokenizer must map {BOS!r} "
                           "to its id")
    if ids.count(bos_id) != num_bos:
        raise RuntimeError("tokenizer added or dropped a BOS id; encode must add no special tokens")
    if not trusted:
        special = getattr(tokenizer, "special_token_ids", frozenset(control_ids))
        leaked = special.intersection(text_ids)
        if leaked:
            raise RuntimeError(f"message text encoded to control ids {sorted(leaked)}; the tokenizer's "
                               "encode_text must never match added tokens")
    return ids
