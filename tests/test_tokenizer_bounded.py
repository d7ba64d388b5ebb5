"""Long text encoded in pieces (inference/text/bounded.py): the ids equal the whole text's, cut at every cut point,
for every BMP character (and a sample of the assigned astral ones) beside every rule; a limit stops the encoding
after a few pieces, and a stretch with no cut is refused by its lower bound without being encoded."""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Iterator

import pytest
import tokenizers

from deepseek_mcp.inference.text import bounded
from deepseek_mcp.inference.text.bounded import PromptTooLong, TokenBounds, alphabet, deepseek_cuts
from deepseek_mcp.inference.text.template import render_ids
from deepseek_mcp.inference.text.tokenizer import Tokenizer

NO_LIMIT = 1 << 40  # a limit that never stops anything: forces the piecewise path even for short text


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def whole(tok: Tokenizer, text: str) -> list[int]:
    """The reference: the backend's own encode of the whole text, in one call."""
    return tok.backend.encode(text, add_special_tokens=False).ids


def whole_plain(tok: Tokenizer, text: str) -> list[int]:
    """The reference for plain text: normalizer (none), pre-tokenizer, model, step by step, on the whole text."""
    backend = tok.backend
    return [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text) for t in backend.model.tokenize(piece)]


def cut_everywhere(text: str, keep_whole: frozenset[str] = frozenset()) -> list[str]:
    """`text` cut at every cut point the rules allow."""
    cuts = [m.start() for m in bounded._CUT.finditer(text)
            if not (text[m.start() - 1] in keep_whole and text[m.start()] in keep_whole)]
    edges = [0, *cuts, len(text)]
    return [text[i:j] for i, j in zip(edges, edges[1:])]


def characters() -> Iterator[str]:
    """Every BMP code point but the surrogates, then every 5th assigned astral one."""
    yield from (chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
    astral = (chr(c) for c in range(0x10000, 0x110000) if unicodedata.category(chr(c)) != "Cn")
    yield from (c for i, c in enumerate(astral) if i % 5 == 0)


def test_the_bundled_tokenizer_is_cut(tok: Tokenizer) -> None:
    assert deepseek_cuts(tok.backend)
    assert tok._cuts and tok._cuts_plain
    assert "\n" not in tok._added_chars and " " not in tok._added_chars


def test_every_character_beside_every_cut_rule_gives_the_whole_ids(tok: Tokenizer) -> None:
    """Each character c after "\\n" (rule 1), before and after a CJK character (rule 4) and before an ASCII letter
    that ends a word (rule 2), with spelled control tokens between, in one text cut at every cut point. (Plain
    text cuts more: also between two characters of added tokens, all ASCII or "▁", "｜", which the ASCII pairs
    and the varied text below cover.)"""
    chars = list(characters())
    backend = tok.backend
    for at in range(0, len(chars), 40_000):
        block = chars[at:at + 40_000]
        text = "".join(f"\n{c}中{c}x" + ("<｜User｜>" if i % 64 == 0 else "") for i, c in enumerate(block))
        pieces = cut_everywhere(text, tok._added_chars)
        assert len(pieces) > 2 * len(block)
        got = [i for e in backend.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
        assert got == whole(tok, text), f"characters {at}..{at + len(block)}"


def test_whole_plain_is_encode_without_added_tokens(tok: Tokenizer) -> None:
    pool = [chr(c) for c in range(0x3000) if not 0xD800 <= c < 0xE000 and chr(c) != "<"]
    text = "".join(random.choices(pool, k=50_000))
    ids = whole(tok, text)
    assert tok.special_token_ids.isdisjoint(ids) and ids == whole_plain(tok, text)


def test_every_pair_of_ascii_characters_gives_the_whole_ids(tok: Tokenizer) -> None:
    ascii_chars = [chr(c) for c in range(128)]
    text = "".join(f"{a}{b}x{a}{b} {b}{a}9\n" for a in ascii_chars for b in ascii_chars)
    backend = tok.backend
    got = [i for e in backend.encode_batch(cut_everywhere(text, tok._added_chars), add_special_tokens=False)
           for i in e.ids]
    assert got == whole(tok, text)
    assert [i for piece in cut_everywhere(text) for i in whole_plain(tok, piece)] == whole_plain(tok, text)


def varied_text(n: int) -> str:
    """Code, prose, CJK, kana, emoji, numbers, whitespace runs, combining marks and spelled control tokens."""
    parts = [
        "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
        "The quick brown fox, 3.14159 × 2 = 6.28318; price: $1,234,567.89!\n",
        "你好，世界。这是一个测试：中文与English混合123个字符。", "ひらがなとカタカナ、ー・゛゜", "😀👍🏽🇫🇷 ",
        " " * 300, "\t\t\n\n\n   \r\n", "e\u0301a\u0300\u0301 ", "<｜User｜>", "<｜end▁of▁sentence｜>", "</think>",
        "12345678901234567890", "ﬁ ﬂ Ⅻ ½ ²³ ٣٤٥", "{\"k\":[1,2,{\"x\":\"y\"}],\"z\":null}", "a" * 200, "-" * 150,
        "\u00a0\u2003\u3000x\u2028y", "Ελληνικά кириллица עברית العربية", "\n", " ",
    ]
    out: list[str] = []
    size = 0
    while size < n:
        part = random.choice(parts)
        out.append(part)
        size += len(part)
    return "".join(out)


@pytest.mark.parametrize("sizes", [(1, 7), (64, 256)])
def test_varied_text_in_small_pieces_equals_the_whole(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch,
                                                      sizes: tuple[int, int]) -> None:
    """The piecewise loop itself (pieces of 1 or 64 characters, cuts searched 7 or 256 at a time) on fresh
    random text, through `encode` and `encode_text`."""
    monkeypatch.setattr(bounded, "PIECE_CHARS", sizes[0])
    monkeypatch.setattr(bounded, "WINDOW_CHARS", sizes[1])
    for _ in range(5):
        text = varied_text(20_000)
        assert tok.encode(text, limit=NO_LIMIT) == whole(tok, text)
        assert tok.encode_text(text, limit=NO_LIMIT) == whole_plain(tok, text)
        # no limit: a long text still goes piece by piece, to the same ids
        assert tok.encode_text(text) == whole_plain(tok, text)


def test_long_plain_text_spelling_control_tokens_in_one_piece(tok: Tokenizer) -> None:
    """No cut for 200k characters, and added tokens spelled: the plain encoding goes through the backend without
    its added tokens (one call that releases the GIL), to the step-by-step ids."""
    text = "<｜User｜> <｜end▁of▁sentence｜>" * 8000
    assert not cut_everywhere(text)[1:]
    assert tok.encode_text(text, limit=NO_LIMIT) == whole_plain(tok, text)
    assert tok._plain is not None


def test_short_text_is_unchanged(tok: Tokenizer) -> None:
    for _ in range(50):
        text = varied_text(random.randrange(1, 600))
        assert tok.encode(text) == whole(tok, text)
        assert tok.encode_text(text) == whole_plain(tok, text)


def test_the_limit_is_exact(tok: Tokenizer) -> None:
    text = varied_text(3000)
    ids = whole(tok, text)
    assert tok.encode(text, limit=len(ids)) == ids
    with pytest.raises(PromptTooLong) as e:
        tok.encode(text, limit=len(ids) - 1)
    assert e.value.num_tokens == len(ids) and e.value.limit == len(ids) - 1


def test_a_limit_stops_after_a_few_pieces(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """15 MB of prose against a 131,071-token limit: refused once the count passes it, having encoded a few
    hundred kB (the old code encoded all 15 MB: about 3.2 M tokens)."""
    encoded: list[int] = []
    piece = tok._encode_piece

    def counting(text: str) -> list[int]:
        encoded.append(len(text))
        return piece(text)

    monkeypatch.setattr(tok, "_encode_piece", counting)
    words = "the quick brown fox jumps over a lazy dog; def return 12345 ünïcode 你好 😀".split()
    text = " ".join(random.choice(words) for _ in range(3_000_000))[:15_000_000]
    limit = 131_071
    for encode in (tok.encode, tok.encode_text):
        encoded.clear()
        with pytest.raises(PromptTooLong) as e:
            encode(text, limit=limit)
        assert limit < e.value.num_tokens < limit + bounded.PIECE_CHARS, e.value.num_tokens
        assert sum(encoded) < 20 * limit, sum(encoded)  # chars encoded: a few per token, not 15 M


@pytest.mark.parametrize("run", ["x", "中", "😀", "<｜User｜> ", ". 😀 "])
def test_a_giant_word_is_refused_by_its_bound_unencoded(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch,
                                                       run: str) -> None:
    """15 MB with no cut: its bytes over its longest possible token (a run of "x": 8 bytes at most per token), or
    a byte's count over the most one token holds ("U": 2), prove it too long, so nothing is encoded."""
    def never(text: str) -> list[int]:
        raise AssertionError(f"encoded {len(text)} characters")

    monkeypatch.setattr(tok, "_encode_piece", never)
    text = run * (15_000_000 // len(run.encode()))
    with pytest.raises(PromptTooLong) as e:
        tok.encode(text, limit=131_071)
    assert e.value.num_tokens > 131_071


def test_token_bounds_are_lower_bounds(tok: Tokenizer) -> None:
    bounds = tok._token_bounds()
    assert bounds.longest(b"x") == 8 and bounds.longest(bytes(range(256))) == 128
    samples = ["x" * 5000, "." * 5000, "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5000)),
               "".join(random.choice("中文你好世界的一是") for _ in range(2000)), "😀" * 1000, varied_text(5000),
               "<｜User｜> " * 500, ". 😀 " * 1000, "".join(random.choice("!?.,;: <>") for _ in range(5000))]
    for text in samples:
        data = text.encode()
        assert alphabet(data) == bytes(sorted(set(data)))
        assert bounds.at_least(data) <= len(whole(tok, text)), text[:20]


def test_alphabet_past_its_sample() -> None:
    data = b"a" * 10_000 + bytes(range(256)) + b"b" * 10
    assert alphabet(data) == bytes(range(256))
    assert alphabet(b"ab" * 5000 + b"z") == b"abz"
    assert TokenBounds([b"ab", b"abab", b"zzz"]).longest(b"ab") == 4


def test_render_ids_stops_at_max_tokens(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": varied_text(2000)}, {"role": "user", "content": varied_text(8000)}]
    for trusted in (False, True):
        ids = render_ids(messages, tok, trusted_control_tokens=trusted)
        assert render_ids(messages, tok, trusted_control_tokens=trusted, max_tokens=len(ids)) == ids
        with pytest.raises(PromptTooLong) as e:
            render_ids(messages, tok, trusted_control_tokens=trusted, max_tokens=len(ids) - 1)
        assert e.value.num_tokens == len(ids)
        with pytest.raises(PromptTooLong) as e:
            render_ids(messages, tok, trusted_control_tokens=trusted, max_tokens=100)
        assert 100 < e.value.num_tokens <= len(ids)


def test_another_pre_tokenizer_is_encoded_whole() -> None:
    """A tokenizer.json whose pre-tokenizer is not DeepSeek's gets no cuts (its ids could differ), and no bounds."""
    data = json.loads(Tokenizer.default().backend.to_str())
    data["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"] = r"\s+|\S+"
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    other = Tokenizer(backend, bos_id=0, eos_id=1, pad_id=2, vocab_size=0, byte_level=True, source="test")
    assert not deepseek_cuts(backend) and not other._cuts_plain
    text = varied_text(30_000)
    plain = [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text) for t in backend.model.tokenize(piece)]
    assert other.encode_text(text, limit=NO_LIMIT) == plain
    assert other.encode(text, limit=NO_LIMIT) == backend.encode(text, add_special_tokens=False).ids
