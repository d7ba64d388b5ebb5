"""Tool-call and JSON grammars, compiled by xgrammar and kept in an LRU.

Tool calls (V3.1 chat template / model card):
    <｜tool▁calls▁begin｜> (<｜tool▁call▁begin｜> NAME <｜tool▁sep｜> ARGS <｜tool▁call▁end｜>)+ <｜tool▁calls▁end｜>
with ARGS compact JSON (no free whitespace, "," and ":" separators) valid for NAME's schema, then EOS; for a
custom tool (`ToolSpec.grammar`) ARGS is raw text in the tool's lark or regex grammar.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr
from xgrammar import structural_tag as st

from deepseek_mcp.inference.constrained.errors import ConstraintError, first_line
from deepseek_mcp.inference.constrained.lexer import Lex
from deepseek_mcp.inference.constrained.numbers import bounded_number_rules
from deepseek_mcp.inference.constrained.planner import Planner
from deepseek_mcp.inference.constrained.schema import SEPARATORS, canonical, commit_cost
from deepseek_mcp.inference.constrained.vocab import GrammarVocab
from deepseek_mcp.inference.text.tools import ToolSpec


def json_ebnf(schema: Mapping[str, Any], where: str) -> str:
    """Compact-JSON grammar (EBNF) of a schema."""
    try:
        grammar = xgr.Grammar.from_json_schema(dict(schema), any_whitespace=False, separators=SEPARATORS,
                                               strict_mode=True)
    except (RuntimeError, ValueError) as e:
        raise ConstraintError(f"{where}: the grammar engine cannot compile the schema: {first_line(e)}") from None
    return bounded_number_rules(str(grammar))


def input_ebnf(tool: ToolSpec) -> str:
    """The grammar of a call's input: compact JSON for the tool's schema, or a custom tool's own grammar
    (lark or regex) for its raw text."""
    where = f"tool {tool.name!r}"
    if tool.grammar is None:
        return json_ebnf(tool.parameters, where)
    syntax, definition = tool.grammar
    try:
        if syntax == "regex":
            grammar = xgr.Grammar.from_regex(definition)
        elif syntax == "lark":
            grammar = xgr.Grammar.from_lark(definition)
        else:
            raise ConstraintError(f"{where}: grammar syntax must be 'lark' or 'regex', got {syntax!r}")
    except (RuntimeError, ValueError) as e:
        if isinstance(e, ConstraintError):
            raise
        raise ConstraintError(f"{where}: the grammar engine cannot compile its {syntax} grammar: "
                              f"{first_line(e)}") from None
    return without_nul(str(grammar))


_CLASS_ITEM = re.compile(r"(\\U[0-9a-fA-F]{8}|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}|\\.|[^\\])"
                         r"(?:-(\\U[0-9a-fA-F]{8}|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}|\\.|[^\\]))?")


def without_nul(ebnf: str) -> str:
    """`ebnf` with NUL taken out of every character class. Control tokens reach the grammar as text that starts
    with NUL (vocab.py), so a class holding NUL (a regex `.` or `[\\s\\S]`) would admit them inside a custom
    tool's text; no text input needs NUL."""
    out, i, n = [], 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c == '"':  # a literal: copied as is
            j = i + 1
            while j < n and ebnf[j] != '"':
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i:j + 1])
            i = j + 1
        elif c == "[":
            j = i + 1
            while j < n and ebnf[j] != "]":
                j += 2 if ebnf[j] == "\\" else 1
            body = ebnf[i + 1:j]
            out.append("[" + (("^\\0" + body[1:]) if body.startswith("^") else _drop_nul(body)) + "]")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _drop_nul(body: str) -> str:
    items = []
    for m in _CLASS_ITEM.finditer(body):
        lo, hi = m.group(1), m.group(2)
        if lo in ("\\0", "\\x00"):
            if hi is None or hi in ("\\0", "\\x00"):
                continue
            lo = "\\x01"
        items.append(lo if hi is None else f"{lo}-{hi}")
    return "".join(items) or body  # a class of NUL alone stays (the planner then finds no way through it)


def tool_calls_tag(tools: Sequence[ToolSpec], vocab: GrammarVocab, *, parallel: bool) -> st.StructuralTag:
    """Structural tag for one tool-call block: calls begin, one call (or more when `parallel`), calls end."""
    ids = vocab.tools
    calls = [
        st.SequenceFormat(elements=[
            st.TokenFormat(token=ids.call_begin), st.ConstStringFormat(value=t.name), st.TokenFormat(token=ids.sep),
            st.GrammarFormat(grammar=input_ebnf(t)), st.TokenFormat(token=ids.call_end),
        ])
        for t in tools
    ]
    one: Any = calls[0] if len(calls) == 1 else st.OrFormat(elements=calls)
    body = st.PlusFormat(content=one) if parallel else one
    return st.StructuralTag(format=st.SequenceFormat(elements=[
        st.TokenFormat(token=ids.calls_begin), body, st.TokenFormat(token=ids.calls_end)]))



@dataclass(frozen=True)
class Compiled:
    grammar: xgr.CompiledGrammar
    jump: int  # tokens one choice can add to the shortest completion: a longer tool's call
    commit: int  # commit_cost of the schemas: an optional property, an array item, an anyOf branch


class GrammarCache:
    """LRU of compiled grammars keyed by (mode, canonical JSON of the schemas); thread-safe."""

    def __init__(self, vocab: GrammarVocab, capacity: int = 64, max_threads: int = 2) -> None:
        self.vocab = vocab
        self.capacity = capacity
        self.planner = Planner(vocab)
        self._compiler = xgr.GrammarCompiler(vocab.info, max_threads=max_threads, cache_enabled=False)
        self._items: OrderedDict[str, Compiled] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def tools(self, tools: Sequence[ToolSpec], parallel: bool) -> Compiled:
        key = canonical(["tools", parallel, [[t.name, t.parameters, t.grammar] for t in tools]])
        return self._get(key, lambda: self._compile_tools(tools, parallel))

    def json(self, schema: Mapping[str, Any] | None, where: str) -> Compiled:
        """schema None: any JSON object."""
        key = canonical(["json", schema])
        return self._get(key, lambda: Compiled(self._compile_json(schema, where), 0,
                                                commit_cost(schema) if schema is not None else 8))

    def _get(self, key: str, build: Any) -> Compiled:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
        compiled = build()  # compile outside the lock; a racing duplicate compile is harmless
        with self._lock:
            self.misses += 1
            self._items[key] = compiled
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return compiled

    def _compile_tools(self, tools: Sequence[ToolSpec], parallel: bool) -> Compiled:
        tag = tool_calls_tag(tools, self.vocab, parallel=parallel)
        try:
            grammar = self._compiler.compile_structural_tag(tag)
        except (RuntimeError, ValueError) as e:
            raise ConstraintError(f"the tool-call grammar does not compile: {first_line(e)}") from None
        # Shortest call of each tool: the spread is how far the plan can jump when the model picks a tool.
        start = xgr.GrammarMatcher(grammar)
        ids = self.vocab.tools
        start.accept_token(ids.calls_begin)
        start.accept_token(ids.call_begin)
        lengths = []
        for t in tools:
            m = start.fork()
            plan = self.planner.plan(m, Lex()) if m.accept_string(t.name) else None
            if plan is None:
                raise ConstraintError(f"tool {t.name!r}: constrained decoding finds no way to finish a call within "
                                      f"{self.planner.max_bytes} tokens (a pattern or format it cannot complete, "
                                      "or a size keyword beyond that)")
            lengths.append(len(self.vocab.tokenizer.encode(t.name)) + len(plan))
        return Compiled(grammar, max(lengths) - min(lengths), max(commit_cost(t.parameters) for t in tools))

    def _compile_json(self, schema: Mapping[str, Any] | None, where: str) -> xgr.CompiledGrammar:
        if schema is None:  # json_object: any object (non-strict so any keys are allowed)
            grammar = xgr.Grammar.from_json_schema({"type": "object"}, any_whitespace=False,
                                                   separators=SEPARATORS, strict_mode=False)
            return self._compiler.compile_grammar(bounded_number_rules(str(grammar)))
        ebnf = json_ebnf(schema, where)
        try:
            return self._compiler.compile_grammar(ebnf)
        except (RuntimeError, ValueError) as e:
            raise ConstraintError(f"{where}: the grammar engine cannot compile the schema: {first_line(e)}") from None
