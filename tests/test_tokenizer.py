from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from deepseek_mcp.inference.text.tokenizer import (
    DEEPSEEK_V31_VOCAB_SIZE,
    V31_SPECIAL_TOKENS,
    Tokenizer,
    bundled_tokenizer_json,
    patch_v3_to_v31,
)

MIXED_TEXTS = [
    "Hello, world! 你好，世界。こんにちは 안녕하세요",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "emoji 🤖🎉👩‍💻 flags 🇫🇷 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ café naïve Ω",
    "混合 text with 中文, English, `code`, and 😀 at the end😀",
    "<｜User｜>写一个 Python 函数<｜Assistant｜><think>先想想</think>好的<｜end▁of▁sentence｜>",
    "   leading spaces, tabs\t\tand\r\nnewlines\n\n\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def _is_incomplete_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _stream(decoder_owner: Tokenizer, ids: list[int], skip: bool = False) -> tuple[list[str], str]:
    dec = decoder_owner.incremental_decoder(skip_special_tokens=skip)
    deltas = [dec.step(i) for i in ids]
    return deltas, dec.flush()


# -- bundled V3.1 vocabulary ------------------------------------------------------------------------------


def test_bundled_ids_and_sizes(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == DEEPSEEK_V31_VOCAB_SIZE == 129280
    assert tok.backend.get_vocab_size(with_added_tokens=True) == 128815
    assert tok.is_byte_level
    assert tok.id_to_token(128815) is None and tok.id_to_token(129279) is None and tok.id_to_token(-1) is None
    assert Tokenizer.load(None) is Tokenizer.default() is tok


@pytest.mark.parametrize("tid", sorted(V31_SPECIAL_TOKENS))
def test_every_special_token_is_one_id(tok: Tokenizer, tid: int) -> None:
    content = V31_SPECIAL_TOKENS[tid]
    assert tok.token_to_id(content) == tid
    assert tok.id_to_token(tid) == content
    assert tok.encode(content) == [tid]
    assert tok.decode([tid]) == content
    assert tid in tok.special_token_ids
    for left, right in [("abc", "xyz"), ("前文", "后文"), ("x ", " y"), ("😀", "\n"), ("<", ">"), ("", "")]:
        ids = tok.encode(left + content + right)
        assert ids.count(tid) == 1
        i = ids.index(tid)
        assert tok.decode(ids[:i]) == left and tok.decode(ids[i + 1:]) == right


def test_all_special_tokens_in_one_text(tok: Tokenizer) -> None:
    text = " mid ".join(V31_SPECIAL_TOKENS.values())
    ids = tok.encode(text)
    assert [i for i in ids if i in V31_SPECIAL_TOKENS] == list(V31_SPECIAL_TOKENS)
    assert tok.decode(ids) == text


def test_search_tokens_replace_v3_placeholders_in_memory_only(tok: Tokenizer) -> None:
    path = bundled_tokenizer_json()
    data = json.loads(path.read_text(encoding="utf-8"))
    on_disk = {t["id"]: t["content"] for t in data["added_tokens"]}
    # V3 ships placeholders there; the file in site-packages must stay untouched.
    assert on_disk[128796] == "<｜place▁holder▁no▁796｜>" and on_disk[128797] == "<｜place▁holder▁no▁797｜>"
    changes = patch_v3_to_v31(data, path)
    assert changes == [
        "id 128796: <｜place▁holder▁no▁796｜> -> <｜search▁begin｜>",
        "id 128797: <｜place▁holder▁no▁797｜> -> <｜search▁end｜>",
    ]
    assert patch_v3_to_v31(data, path) == []  # idempotent
    assert tok.token_to_id("<｜place▁holder▁no▁796｜>") is None
    assert tok.encode("<｜place▁holder▁no▁796｜>") != [128796]


def test_patch_adds_missing_and_rejects_conflicts(tmp_path: Path) -> None:
    data = {"model": {"type": "BPE", "vocab": {}}, "added_tokens": [
        {"id": 0, "content": "<｜begin▁of▁sentence｜>", "special": True},
    ]}
    changes = patch_v3_to_v31(data, tmp_path)
    assert len(changes) == len(V31_SPECIAL_TOKENS) - 1
    assert {t["id"]: t["content"] for t in data["added_tokens"]} == dict(V31_SPECIAL_TOKENS)
    assert {t["id"] for t in data["added_tokens"] if t["special"]} == {0, 1, 2, 128805}  # as V3 flags them
    bad = {"model": {}, "added_tokens": [{"id": 128798, "content": "<unexpected>", "special": True}]}
    with pytest.raises(ValueError, match=r"id 128798 holds '<unexpected>', expected '<think>'"):
        patch_v3_to_v31(bad, tmp_path)


def test_skip_special_tokens(tok: Tokenizer) -> None:
    ids = [tok.bos_id, *tok.encode("<｜User｜>hi<｜Assistant｜><think>x</think>ok"), tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>hi<｜Assistant｜><think>x</think>ok"
    assert tok.decode(ids).startswith("<｜begin▁of▁sentence｜>")
    deltas, tail = _stream(tok, ids, skip=True)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)


# -- round trip and streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < 128815 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_incremental_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert tail == ""
    assert all("\ufffd" not in d for d in deltas)  # never emits half a character


def test_split_characters_are_held_back(tok: Tokenizer) -> None:
    text = MIXED_TEXTS[2]
    ids = tok.encode(text)
    partial = [i for i in ids if _is_incomplete_utf8(tok.piece_bytes(i))]
    assert partial, "test text must contain a character split across byte-level tokens"
    dec = tok.incremental_decoder()
    emitted, held_back = "", 0
    for j, i in enumerate(ids):
        emitted += dec.step(i)
        sent = b"".join(tok.piece_bytes(k) for k in ids[: j + 1])
        if _is_incomplete_utf8(sent):  # the last character is not complete yet: nothing of it is emitted
            held_back += 1
            assert emitted.encode() == sent[: len(emitted.encode())] and len(emitted.encode()) < len(sent)
        else:
            assert emitted == tok.decode(ids[: j + 1])
    assert held_back > 0 and emitted + dec.flush() == text
    # a stream cut inside a character: flush gives exactly what one-shot decode gives (U+FFFD)
    robot = tok.encode("ok 🤖")
    assert any(_is_incomplete_utf8(tok.piece_bytes(i)) for i in robot)
    cut = robot[:-1]
    deltas, tail = _stream(tok, cut)
    assert "".join(deltas) == "ok "
    assert "".join(deltas) + tail == tok.decode(cut) and tail.endswith("\ufffd")


def test_incremental_matches_decode_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random()  # fresh every run
    specials = sorted(V31_SPECIAL_TOKENS)
    partial_ids = [i for i in range(300) if _is_incomplete_utf8(tok.piece_bytes(i))]  # raw byte tokens
    assert partial_ids
    for _ in range(20):
        n = rng.randrange(1, 200)
        ids = [rng.choice((rng.randrange(128815), rng.choice(specials), rng.choice(partial_ids),
                           rng.randrange(128815, 129280))) for _ in range(n)]
        for skip in (False, True):
            deltas, tail = _stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids


# -- checkpoint tokenizers and errors ------------------------------------------------------------------------


def _write_wordlevel(folder: Path) -> Path:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "ça": 5, "va": 6}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    backend.save(str(path))
    return path


def test_checkpoint_tokenizer_preferred(tmp_path: Path) -> None:
    _write_wordlevel(tmp_path)
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64}))
    tok = Tokenizer.load(tmp_path)
    assert tok is not Tokenizer.default()
    assert tok.encode("hello world") == [3, 4]
    assert tok.encode("<s>hello nope</s>") == [1, 3, 0, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.vocab_size == 64
    assert tok.special_token_ids == frozenset({1, 2})
    assert not tok.is_byte_level
    ids = tok.encode("hello ça va world")
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "hello ça va world"
    # a tokenizer.json path works the same; vocab falls back to the tokenizer's own size without config.json
    other = _write_wordlevel(tmp_path / "plain")
    assert Tokenizer.load(other).vocab_size == 7 and Tokenizer.load(str(other)).encode("va") == [6]


@pytest.mark.parametrize("wrap_decoder", [False, True])
def test_small_byte_level_checkpoint_streams_exactly(tmp_path: Path, wrap_decoder: bool) -> None:
    """A tiny byte-level BPE (multi-byte characters stay split into byte tokens). With a plain ByteLevel
    decoder the byte path runs; wrapped in a Sequence the generic window path runs. Both must hold back
    split characters and reproduce one-shot decode."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world, this is a tiny corpus"] * 20, trainer)
    backend.decoder = decoders.Sequence([decoders.ByteLevel()]) if wrap_decoder else decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.is_byte_level is not wrap_decoder and tok.eos_id is None
    text = "hello 世界 🤖 wörld<eos>, tiny 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.token_to_id("<eos>") in ids
    dec = tok.incremental_decoder()
    deltas = [dec.step(i) for i in ids]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 5  # each of 世, 界, 🤖, 😀 spans several byte tokens: partial steps emit nothing
    cut = tok.encode("ab 🤖")[:-1]
    dec = tok.incremental_decoder()
    assert "".join(dec.step(i) for i in cut) + dec.flush() == tok.decode(cut) == "ab \ufffd"


def test_checkpoint_without_tokenizer_uses_bundled(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.load(tmp_path) is Tokenizer.default()


def test_missing_and_corrupt_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.load(missing)
    corrupt = tmp_path / "bad"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    bad_file = re.escape(str(corrupt / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"corrupt tokenizer file {bad_file}: invalid JSON"):
        Tokenizer.load(corrupt)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(ValueError, match=rf"corrupt tokenizer file {re.escape(str(wrong))}"):
        Tokenizer.load(wrong)
    not_tok = tmp_path / "list.json"
    not_tok.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(not_tok))}.*no 'model' key"):
        Tokenizer.load(not_tok)
