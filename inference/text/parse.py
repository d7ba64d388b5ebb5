"""Incremental parser for DeepSeek-V3.1 output: reasoning, content, tool calls and search blocks.

Feed the detokenized text deltas as the engine streams them (`feed` returns events), call `finish()` once the
output ends, then read `result()`. Output grammar (V3.1):

    thinking mode:  REASONING </think> CONTENT        (the prompt already ends with <think>)
    non-thinking:   CONTENT                            (the prompt already ends with </think>)
    tool calls:     <｜tool▁calls▁begin｜> (<｜tool▁call▁begin｜> NAME <｜tool▁sep｜> ARGS <｜tool▁call▁end｜>)+
                    <｜tool▁calls▁end｜>               (anywhere in reasoning or content)
    search:         <｜search▁begin｜> QUERY <｜search▁end｜>

Decisions:
- A marker is recognized only where it has a meaning; elsewhere it is kept as ordinary text, so nothing the
  model wrote is hidden. `</think>` is a marker only while in reasoning: the first one ends the reasoning; in
  non-thinking mode (or after reasoning ended) a `</think>` is content text, since we cannot tell the control
  token from a model writing the same characters, and dropping user-visible text would be worse. `<think>` is
  never a marker. `<｜end▁of▁sentence｜>` is a marker everywhere (dropped, no state change).
- Inside a call's arguments only the call/block terminators are markers: `</think>`, `<｜tool▁sep｜>` and search
  tokens there are argument text (arguments may hold any text: newlines, braces, quotes, `<`).
- A call ends at `<｜tool▁call▁end｜>`, or at `<｜tool▁call▁begin｜>` / `<｜tool▁calls▁end｜>` when the model
  skipped the call end. A bare `<｜tool▁call▁begin｜>` without the block opener starts a call (Kimi-style bare
  calls; DeepSeek distills too), as do the opener spellings llama.cpp accepts for DeepSeek models
  (`<｜tool_calls_begin｜>`, `<｜tool calls begin｜>`, `<｜tool\\_calls\\_begin｜>`, `<｜tool▁calls｜>`); one
  block per call (seen from distilled checkpoints) works naturally. Text between calls of a block goes to the
  surrounding channel; after the block the surrounding channel (reasoning or content) resumes.
- Arguments are raw text pieces while streaming (never a synthesized `{}`); at the end they are parsed as JSON:
  `arguments` is the parsed value whenever the raw text parses, `valid` needs a complete call, a JSON object,
  and (when tools were offered) a known name; `error` says what is wrong. A JSON string holding a JSON object
  (arguments double-encoded, as models copy from double-encoded history) is unwrapped once.
- Search blocks (V3.1's search-agent tokens) are kept apart from reasoning/content in `searches`, with events.
- Deltas may split markers anywhere: only a tail that could still become a marker is held back (every marker
  has a single `<`, at its start, so that tail starts at the last `<`). The final result does not depend on how
  the text was split, and `reassemble()` rebuilds the exact input from the recorded segments.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from deepseek_mcp.inference.text.control import (
    EOS,
    SEARCH_BEGIN,
    SEARCH_END,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
)
from deepseek_mcp.inference.text.finite_json import NonFiniteNumber, loads_finite

CALLS_BEGIN_VARIANTS = (TOOL_CALLS_BEGIN, "<｜tool_calls_begin｜>", "<｜tool calls begin｜>",
                        "<｜tool\\_calls\\_begin｜>", "<｜tool▁calls｜>")
CALLS_END_VARIANTS = (TOOL_CALLS_END, "<｜tool_calls_end｜>", "<｜tool calls end｜>", "<｜tool\\_calls\\_end｜>")

# Modes of the state machine.
_TEXT, _BLOCK, _NAME, _ARGS, _SEARCH = "text", "block", "name", "args", "search"


def _active_markers() -> Mapping[tuple[str, bool], tuple[tuple[str, str], ...]]:
    # (mode, in_reasoning) -> ((marker text, kind), ...): the markers that mean something there.
    eos = ((EOS, "eos"),)
    begins = tuple((m, "calls_begin") for m in CALLS_BEGIN_VARIANTS)
    ends = tuple((m, "calls_end") for m in CALLS_END_VARIANTS)
    call_begin = ((TOOL_CALL_BEGIN, "call_begin"),)
    think_end = ((THINK_END, "think_end"),)
    table: dict[tuple[str, bool], tuple[tuple[str, str], ...]] = {}
    for reasoning in (False, True):
        think = think_end if reasoning else ()
        table[(_TEXT, reasoning)] = begins + call_begin + ((SEARCH_BEGIN, "search_begin"),) + eos + think
        table[(_BLOCK, reasoning)] = call_begin + ends + begins + eos + think
        table[(_NAME, reasoning)] = ((TOOL_SEP, "sep"), (TOOL_CALL_END, "call_end")) + call_begin + ends + eos
        table[(_ARGS, reasoning)] = ((TOOL_CALL_END, "call_end"),) + call_begin + ends + eos
        table[(_SEARCH, reasoning)] = ((SEARCH_END, "search_end"),) + eos
    return MappingProxyType(table)


ACTIVE_MARKERS = _active_markers()
ALL_MARKERS = tuple(sorted({m for ms in ACTIVE_MARKERS.values() for m, _ in ms}))


# ---------------------------------------------------------------------------------------------------------
# Results and events


@dataclass(frozen=True)
class ToolCall:
    name: str  # stripped of surrounding whitespace
    arguments: Any  # parsed JSON when `raw` parses, else None (never a made-up {})
    raw: str  # the argument text exactly as generated
    valid: bool
    error: str | None
    complete: bool  # closed by a marker (False: the output ended inside the call)
    in_reasoning: bool = False


@dataclass(frozen=True)
class SearchBlock:
    text: str
    complete: bool
    in_reasoning: bool = False


@dataclass(frozen=True)
class ParseResult:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    searches: list[SearchBlock]
    complete: bool  # finish() was called and no call, tool block or search was left open

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# _END: the text events and ToolCallStarted carry `end`, the offset in the parser's input (characters fed) just
# past what they report (for ToolCallStarted: past the separator), so a caller can map them back onto the
# tokens that wrote them; not part of equality (-1 where the event was made elsewhere).


@dataclass(frozen=True)
class ReasoningDelta:
    text: str
    end: int = dataclasses.field(default=-1, compare=False)  # see _END


@dataclass(frozen=True)
class ContentDelta:
    text: str
    end: int = dataclasses.field(default=-1, compare=False)  # see _END


@dataclass(frozen=True)
class ToolCallStarted:
    index: int
    name: str
    end: int = dataclasses.field(default=-1, compare=False)  # see _END


@dataclass(frozen=True)
class ToolArgumentsDelta:
    index: int
    text: str  # a raw piece of the argument text
    end: int = dataclasses.field(default=-1, compare=False)  # see _END


@dataclass(frozen=True)
class ToolCallFinished:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class SearchStarted:
    index: int


@dataclass(frozen=True)
class SearchDelta:
    index: int
    text: str


@dataclass(frozen=True)
class SearchFinished:
    index: int
    search: SearchBlock


Event = (ReasoningDelta | ContentDelta | ToolCallStarted | ToolArgumentsDelta | ToolCallFinished
         | SearchStarted | SearchDelta | SearchFinished)


# ---------------------------------------------------------------------------------------------------------
# Parser


def _find_marker(buf: str, markers: tuple[tuple[str, str], ...]) -> tuple[int, str, str] | None:
    i = buf.find("<")
    while i != -1:
        for marker, kind in markers:
            if buf.startswith(marker, i):
                return i, marker, kind
        i = buf.find("<", i + 1)
    return None


def _held_back(buf: str, markers: tuple[tuple[str, str], ...]) -> int:
    # Length of the tail that may still grow into a marker (it starts at the last '<', see module doc).
    i = buf.rfind("<")
    if i == -1:
        return 0
    tail = buf[i:]
    return len(tail) if any(len(tail) < len(m) and m.startswith(tail) for m, _ in markers) else 0


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def parse_arguments(raw: str) -> tuple[Any, str | None]:
    """(parsed value or None, error or None) for a call's raw argument text."""
    if not raw.strip():
        return None, "empty arguments: expected a JSON object"
    try:
        value = loads_finite(raw)
    except json.JSONDecodeError as e:
        return None, f"arguments are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    except NonFiniteNumber as e:
        return None, f"arguments hold a number that is not a finite double: {e}"
    if isinstance(value, str):  # double-encoded: a JSON string whose text is the JSON object
        try:
            inner = loads_finite(value)
        except ValueError:  # not JSON, or not finite
            inner = None
        if isinstance(inner, dict):
            return inner, None
    if not isinstance(value, dict):
        return value, f"arguments must be a JSON object, got {_JSON_TYPES.get(type(value), 'null')}"
    return value, None


def _tool_names(tools: Iterable[Any] | None) -> frozenset[str] | None:
    if tools is None:
        return None
    if isinstance(tools, str):
        return frozenset((tools,))
    names: set[str] = set()
    for t in tools:
        if isinstance(t, Mapping):  # also accept tool specs (MCP or OpenAI style)
            t = t["function"].get("name") if isinstance(t.get("function"), Mapping) else t.get("name")
        elif not isinstance(t, str):
            t = getattr(t, "name", None)
        if isinstance(t, str):
            names.add(t)
    return frozenset(names)


class StreamParser:
    """Streaming parser for one generation. `thinking`: the prompt ended with `<think>` (output starts in
    reasoning). `tools`: the offered tool names (or specs); calls to other names are flagged; None: no check."""

    def __init__(self, thinking: bool = False, tools: Iterable[Any] | None = None) -> None:
        self._tools = _tool_names(tools)
        self._in_reasoning = bool(thinking)
        self._mode = _TEXT
        self._block_open = False
        self._buf = ""  # held-back tail (a possible marker prefix)
        self._fed = 0  # characters fed so far
        self._segments: list[tuple[str, list[str]]] = []  # (kind, pieces), adjacent kinds merged
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._searches: list[SearchBlock] = []
        self._name: list[str] = []
        self._args: list[str] = []
        self._saw_sep = False
        self._search: list[str] = []
        self._opened_in_reasoning = False
        self._finished = False

    # -- public ---------------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish(); use a new parser per generation")
        events: list[Event] = []
        if delta:
            self._buf += delta
            self._fed += len(delta)
            self._drain(events, final=False)
        return events

    def finish(self) -> list[Event]:
        """Flush held-back text and close whatever is open (an open call or search is reported incomplete)."""
        if self._finished:
            return []
        events: list[Event] = []
        self._drain(events, final=True)
        if self._mode in (_NAME, _ARGS):
            self._end_call(events, complete=False)
        elif self._mode == _SEARCH:
            self._end_search(events, complete=False)
        self._finished = True
        return events

    def result(self) -> ParseResult:
        """The parse so far (final after `finish()`); an open call/search shows as incomplete."""
        calls = list(self._calls)
        searches = list(self._searches)
        if self._mode in (_NAME, _ARGS):
            calls.append(self._make_call(complete=False))
        elif self._mode == _SEARCH:
            searches.append(SearchBlock("".join(self._search), False, self._opened_in_reasoning))
        complete = (self._finished and not self._block_open and all(c.complete for c in calls)
                    and all(s.complete for s in searches))
        return ParseResult("".join(self._reasoning), "".join(self._content), calls, searches, complete)

    def segments(self) -> list[tuple[str, str]]:
        """(kind, text) in input order; kinds: reasoning, content, marker, tool_name, tool_args, search, held."""
        out = [(kind, "".join(pieces)) for kind, pieces in self._segments]
        if self._buf:
            out.append(("held", self._buf))
        return out

    @property
    def held_back(self) -> int:
        """Characters at the end of the input fed so far that are held back (a possible marker prefix): all
        the input before them has been reported as events or recognized as markers."""
        return len(self._buf)

    def reassemble(self) -> str:
        """The exact input fed so far, rebuilt from the segments (nothing is ever lost)."""
        return "".join(text for _, text in self.segments())

    # -- internals ------------------------------------------------------------------------------------

    def _drain(self, events: list[Event], final: bool) -> None:
        while self._buf:
            markers = ACTIVE_MARKERS[(self._mode, self._in_reasoning)]
            found = _find_marker(self._buf, markers)
            if found is None:
                keep = 0 if final else _held_back(self._buf, markers)
                if keep < len(self._buf):
                    self._text(self._buf[: len(self._buf) - keep], events)
                    self._buf = self._buf[len(self._buf) - keep:]
                return
            pos, marker, kind = found
            if pos:
                self._text(self._buf[:pos], events)
            self._buf = self._buf[pos + len(marker):]
            self._record("marker", marker)
            self._on_marker(kind, events)

    def _record(self, kind: str, text: str) -> None:
        if self._segments and self._segments[-1][0] == kind:
            self._segments[-1][1].append(text)
        else:
            self._segments.append((kind, [text]))

    def _consumed(self) -> int:
        return self._fed - len(self._buf)

    def _text(self, text: str, events: list[Event]) -> None:
        end = self._consumed() + len(text)  # the text is still at the front of the buffer
        if self._mode in (_TEXT, _BLOCK):
            if self._in_reasoning:
                self._reasoning.append(text)
                self._record("reasoning", text)
                events.append(ReasoningDelta(text, end))
            else:
                self._content.append(text)
                self._record("content", text)
                events.append(ContentDelta(text, end))
        elif self._mode == _NAME:
            self._name.append(text)
            self._record("tool_name", text)
        elif self._mode == _ARGS:
            self._args.append(text)
            self._record("tool_args", text)
            events.append(ToolArgumentsDelta(len(self._calls), text, end))
        else:
            self._search.append(text)
            self._record("search", text)
            events.append(SearchDelta(len(self._searches), text))

    def _on_marker(self, kind: str, events: list[Event]) -> None:
        if kind == "eos":
            return
        if kind == "think_end":
            self._in_reasoning = False
        elif kind == "calls_begin":
            self._block_open = True
            self._mode = _BLOCK
        elif kind == "calls_end":
            if self._mode in (_NAME, _ARGS):
                self._end_call(events, complete=True)
            self._block_open = False
            self._mode = _TEXT
        elif kind == "call_begin":
            if self._mode in (_NAME, _ARGS):  # the previous call lacked its end marker
                self._end_call(events, complete=True)
            self._mode, self._name, self._args, self._saw_sep = _NAME, [], [], False
            self._opened_in_reasoning = self._in_reasoning
        elif kind == "sep":
            self._mode, self._saw_sep = _ARGS, True
            events.append(ToolCallStarted(len(self._calls), "".join(self._name).strip(), self._consumed()))
        elif kind == "call_end":
            self._end_call(events, complete=True)
        elif kind == "search_begin":
            self._mode, self._search = _SEARCH, []
            self._opened_in_reasoning = self._in_reasoning
            events.append(SearchStarted(len(self._searches)))
        elif kind == "search_end":
            self._end_search(events, complete=True)

    def _make_call(self, complete: bool) -> ToolCall:
        name = "".join(self._name).strip()
        raw = "".join(self._args)
        errors: list[str] = []
        if not name:
            errors.append("empty tool name")
        elif self._tools is not None and name not in self._tools:
            offered = ", ".join(sorted(self._tools)) or "none"
            errors.append(f"unknown tool {name!r} (offered: {offered})")
        arguments = None
        if not complete:
            errors.append(f"unterminated tool call: the output ended before {TOOL_CALL_END}")
        elif not self._saw_sep:
            errors.append(f"malformed tool call: no {TOOL_SEP} between the name and the arguments")
        else:
            arguments, error = parse_arguments(raw)
            if error is not None:
                errors.append(error)
        return ToolCall(name, arguments, raw, not errors, "; ".join(errors) or None, complete,
                        self._opened_in_reasoning)

    def _end_call(self, events: list[Event], complete: bool) -> None:
        index = len(self._calls)
        if not self._saw_sep:  # the name never got its separator: announce the call before closing it
            events.append(ToolCallStarted(index, "".join(self._name).strip(), self._consumed()))
        call = self._make_call(complete)
        self._calls.append(call)
        events.append(ToolCallFinished(index, call))
        self._mode = _BLOCK if self._block_open else _TEXT

    def _end_search(self, events: list[Event], complete: bool) -> None:
        block = SearchBlock("".join(self._search), complete, self._opened_in_reasoning)
        events.append(SearchFinished(len(self._searches), block))
        self._searches.append(block)
        self._mode = _BLOCK if self._block_open else _TEXT


def parse(text: str, *, thinking: bool = False, tools: Iterable[Any] | None = None) -> ParseResult:
    """One-shot parse of a whole output."""
    parser = StreamParser(thinking, tools)
    parser.feed(text)
    parser.finish()
    return parser.result()
