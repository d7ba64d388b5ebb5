"""Long text encoded in pieces, with exactly the ids of encoding it whole, and only as far as a token limit.

A body just under the 16 MiB limit holds millions of tokens. Encoded whole it took 13-27 s and 1.2-2.9 GB
before the context check refused it, in one call that held the GIL (so `/health` waited as long). Here the text
is cut into pieces of about `PIECE_CHARS` characters, each encoded by its own call (one that releases the GIL for
long pieces), and encoding stops at the first piece that takes the count past the limit (`PromptTooLong`).

**Exact.** The tokenizer's pre-tokenizer splits text into pieces and BPE runs within each, so the ids of two
parts concatenate to the ids of the whole wherever the pre-tokenizer ends a piece no matter what stands before
and after. DeepSeek-V3's pre-tokenizer (`DEEPSEEK_SPLITS`) runs three splits in turn, each on the pieces of the
one before: (1) `\\p{N}{1,3}` isolated, (2) runs of `[一-龥぀-ゟ゠-ヿ]` isolated, (3) the alternatives
`A1 [punct][A-Za-z]+ | A2 [^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+ | A3 ' '?[\\p{P}\\p{S}]+[\\r\\n]* |
A4 \\s*[\\r\\n]+ | A5 \\s+(?!\\S) | A6 \\s+` (leftmost first, no lookbehind, no anchors). A cut between
a = text[p-1] and b = text[p] is exact when no match of any split holds both a and b, and the match that holds a
ends at p having read nothing past a that the end of the text would change (then every match before p is the
same in the first part, and matching resumes at p as it starts on the second part). The cuts made here:
1. a = "\\n", b not whitespace: no split-1/2 match holds "\\n"; in split 3 only A3 (its `[\\r\\n]*`) and A4 hold a
   newline and both end at the first character that is not one (b); A5/A6 never reach it, since A4 comes first
   and matches wherever a whitespace run holding a newline starts.
2. a an ASCII letter, b an ASCII character that is not a letter: a is never a digit or CJK; in split 3 only the
   letter runs of A1/A2 hold it, and they end at b (no ASCII character is \\p{L} or \\p{M} but letters).
3. a an ASCII character that is not a digit, b an ASCII digit: split 1 starts a match at b.
4. one of a, b in the CJK class and the other not: split 2's run ends (or starts) at p (no character of the class
   is a digit, so split 1 holds them apart too).
`encode` first matches added tokens (control tokens) in the text: it cuts only where a or b appears in no added
token (so no added token spans the cut), and only when no added token strips the space beside it. A tokenizer
whose normalizer or pre-tokenizer differs (another checkpoint's `tokenizer.json`) is encoded whole.
`tests/test_tokenizer_bounded.py` checks the ids against the whole encoding: every BMP character (and a fifth of
the assigned astral ones) beside rules 1, 2 and 4, every pair of ASCII characters, varied text cut everywhere.

**Bounded.** A stretch with no cut (megabytes of one word, of one run of punctuation, of a pattern without ASCII
letters or digits) is first checked against lower bounds that need no encoding (`TokenBounds`); only one they
cannot refuse is encoded whole (at most `longest entry x limit` bytes: 8 x limit for a run of "x", 128 x limit
for a run of dots, which is then a prompt the context may take).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

PIECE_CHARS = 1 << 14  # a piece ends at the first cut after this many characters
WINDOW_CHARS = 1 << 16  # cuts are searched for this many characters at a time (one regex call each)
BOUND_CHARS = 1 << 18  # an uncut stretch this long is checked against TokenBounds (and again each time it doubles)

_CJK = "\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff"  # split 2's class: 一-龥, ぀-ゟ, ゠-ヿ
_CUT = re.compile(
    r"(?<=\n)(?=\S)"  # 1
    r"|(?<=[A-Za-z])(?=[\x00-\x40\x5b-\x60\x7b-\x7f])"  # 2
    r"|(?<=[\x00-\x2f\x3a-\x7f])(?=[0-9])"  # 3
    rf"|(?<=[{_CJK}])(?=[^{_CJK}])|(?<=[^{_CJK}])(?=[{_CJK}])"  # 4
)

# DeepSeek-V3's (and V3.1's) pre-tokenizer, as its tokenizer.json spells it: the one the cuts above are exact for.
DEEPSEEK_SPLITS = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)


class PromptTooLong(ValueError):
    """More than `limit` tokens: at least `num_tokens` (the rest of the text was not encoded). `where` names the
    prompt in a batch ("prompt[2]")."""

    def __init__(self, num_tokens: int, limit: int, where: str = "") -> None:
        super().__init__(f"{where + ': ' if where else ''}the prompt is more than {limit} tokens (at least "
                         f"{num_tokens})")
        self.num_tokens = num_tokens
        self.limit = limit
        self.where = where


def deepseek_cuts(backend: Any) -> bool:
    """Whether the cuts are exact for this `tokenizers.Tokenizer`: no normalizer (or an empty one), DeepSeek-V3's
    three splits then a byte-level step with no regex of its own, and a BPE model without dropout."""
    normalizer = _state(backend.normalizer)
    if normalizer is not None and normalizer != {"type": "Sequence", "normalizers": []}:
        return False
    model = backend.model
    if type(model).__name__ != "BPE" or getattr(model, "dropout", None) is not None:
        return False
    steps = (_state(backend.pre_tokenizer) or {}).get("pretokenizers") or []
    if len(steps) != len(DEEPSEEK_SPLITS) + 1:
        return False
    splits, last = steps[:-1], steps[-1]
    same = all(s.get("type") == "Split" and s.get("pattern") == {"Regex": r} and s.get("behavior") == "Isolated"
               and not s.get("invert") for s, r in zip(splits, DEEPSEEK_SPLITS))
    return same and last.get("type") == "ByteLevel" and not last.get("add_prefix_space") and not last.get("use_regex")


def without_added_tokens(backend: Any) -> Any:
    """`backend` (a `tokenizers.Tokenizer`) without its added tokens: its `encode` is normalizer, pre-tokenizer,
    model, the plain-text pipeline, in one call that releases the GIL (~0.7 s and 60-90 MB to build)."""
    data = json.loads(backend.to_str())
    data["added_tokens"] = []
    return type(backend).from_str(json.dumps(data))


def _state(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


class TokenBounds:
    """Lower bounds on a byte-level piece's token count that need no encoding. Its tokens are vocabulary entries
    made of the piece's own bytes, so a piece of n bytes over the byte set S takes at least n / L(S) tokens, L(S)
    the longest entry whose bytes all lie in S (8 for a run of "x", 20 for lowercase letters, 128 at most); and
    one holding byte b f times takes at least f / M(b), M(b) the most times one entry holds b (2 for "U", "<" or
    an emoji's lead byte, 5 for "e", 128 for a space)."""

    def __init__(self, entries: Iterable[bytes]) -> None:
        self._entries = sorted({e for e in entries if e}, key=len, reverse=True)
        self._longest: dict[bytes, int] = {}
        most = [1] * 256
        for e in self._entries:
            for b in set(e):
                most[b] = max(most[b], e.count(b))
        self._most = tuple(most)

    def longest(self, alphabet: bytes) -> int:
        """The longest entry made of the bytes in `alphabet` (1 if none: a byte alone is a token)."""
        if alphabet not in self._longest:
            self._longest[alphabet] = next((len(e) for e in self._entries if not e.translate(None, alphabet)), 1)
        return self._longest[alphabet]

    def at_least(self, data: bytes) -> int:
        present = alphabet(data)
        bound = -(-len(data) // self.longest(present))
        for b in sorted(present, key=self._most.__getitem__)[:16]:  # the bytes fewest to an entry
            bound = max(bound, -(-data.count(b) // self._most[b]))
        return bound


def alphabet(data: bytes) -> bytes:
    """The distinct bytes of `data`, sorted: sampled from its head, widened while any byte is left out (a few passes
    of `bytes.translate`, not a Python loop over the bytes), or all 256 after four passes."""
    seen = set(data[:4096])
    for _ in range(4):
        rest = data.translate(None, bytes(seen))
        if not rest:
            return bytes(sorted(seen))
        seen.update(rest[:4096])
    return bytes(range(256))


def encode_in_pieces(text: str, encode: Callable[[str], list[int]], *, limit: int | None, cuts: bool,
                     keep_whole: frozenset[str] = frozenset(),
                     bounds: Callable[[], TokenBounds] | None = None) -> list[int]:
    """`encode(text)`, piece by piece where `cuts` allows (see above; `keep_whole`: characters of added tokens,
    never cut between two of them), raising PromptTooLong once more than `limit` ids are certain. `bounds`:
    TokenBounds for the tokenizer, asked for only when a long stretch has no cut."""
    ids: list[int] = []
    start, size = 0, len(text)

    def refuse_early(stretch: str) -> None:
        if limit is not None and bounds is not None:
            at_least = len(ids) + bounds().at_least(stretch.encode("utf-8", "surrogatepass"))
            if at_least > limit:
                raise PromptTooLong(at_least, limit)

    while start < size:
        end = size
        if cuts:
            pos, check_at = start + PIECE_CHARS, start + BOUND_CHARS
            while pos < size:
                cut = _first_cut(text, pos, min(pos + WINDOW_CHARS, size), keep_whole)
                if cut is not None:
                    end = cut
                    break
                pos += WINDOW_CHARS
                if pos >= check_at and pos < size:  # no cut yet: refuse what is already too long, if it is
                    refuse_early(text[start:pos])
                    check_at = start + 2 * (pos - start)
        piece = text[start:end]
        if end - start > BOUND_CHARS:
            refuse_early(piece)
        ids += encode(piece)
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(len(ids), limit)
        start = end
    return ids


def _first_cut(text: str, pos: int, end: int, keep_whole: frozenset[str]) -> int | None:
    """The first cut at a position in [pos, end] (lookbehind sees text before pos; text[end] is looked at)."""
    for m in _CUT.finditer(text, pos, min(end + 1, len(text))):
        at = m.start()
        if not (text[at - 1] in keep_whole and text[at] in keep_whole):
            return at
    return None
