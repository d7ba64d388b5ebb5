"""Builds per-request constrained-decoding processors from tools, tool_choice or a response_format.

    factory = ConstraintFactory(tokenizer)                       # once per server (vocab + grammar cache)
    proc = factory.for_tools(tools, "required", max_tokens=256)  # one per request, before generation
    proc = factory.for_response_format({"type": "json_schema", "schema": {...}}, max_tokens=256)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import xgrammar as xgr

from deepseek_mcp.inference.constrained.errors import ConstraintError
from deepseek_mcp.inference.constrained.grammars import Compiled, GrammarCache
from deepseek_mcp.inference.constrained.lexer import Lex
from deepseek_mcp.inference.constrained.processors import GrammarProcessor, GrammarStart
from deepseek_mcp.inference.constrained.schema import check_schema, constrained_tools, size_keywords
from deepseek_mcp.inference.constrained.tool_ban import ToolBan
from deepseek_mcp.inference.constrained.vocab import GrammarVocab
from deepseek_mcp.inference.text.tokenizer import Tokenizer


def parse_tool_choice(choice: Any) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", name) from a string, {"name"}, {"type", "function": {"name"}},
    or an object with `.mode` / `.name` (mcp_server.tool_specs.ToolChoice)."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ConstraintError(f"tool_choice must be 'auto', 'none', 'required' or {{'name': ...}}; got {choice!r}")
        return choice, None
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
    else:
        name = getattr(choice, "name", None)
        if name is None:
            return parse_tool_choice(getattr(choice, "mode", None))
    if not isinstance(name, str):
        raise ConstraintError(f"tool_choice {choice!r} names no tool")
    return "named", name


class ConstraintFactory:
    """Builds per-request processors. Holds the vocabulary (built once, ~0.5 s), the grammar compiler and an
    LRU of compiled grammars. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int | None = None, cache_size: int = 64,
                 slack: int = 24, top_k: int = 8) -> None:
        self.vocab = GrammarVocab.build(tokenizer, vocab_size)
        self.cache = GrammarCache(self.vocab, cache_size)
        self.planner = self.cache.planner
        self.slack = slack
        self.top_k = top_k

    def for_tools(self, tools: Sequence[Any], tool_choice: Any = "auto", max_tokens: int = 256, *,
                  parallel_tool_calls: bool = True, thinking: bool = False) -> GrammarProcessor | ToolBan:
        """tool_choice "none" (or no tools with "auto"): a ToolBan. "auto": free text until the model opens a
        tool-call block, then the grammar. "required" / {"name": ...}: the grammar from the first token (after
        the reasoning when `thinking`). Raises ConstraintError for bad tools/schemas/choices or a max_tokens
        below the shortest possible call."""
        mode, name = parse_tool_choice(tool_choice)
        if mode == "none" or (mode == "auto" and not tools):
            v = self.vocab
            return ToolBan(v.tools.all_ids, v.token_bytes, v.marker_ban)
        defs = constrained_tools(tools)
        if name is not None:
            defs = [d for d in defs if d.name == name]
            if not defs:
                raise ConstraintError(f"tool_choice names {name!r}, which is not among the offered tools")
        if not defs:
            raise ConstraintError("tool_choice 'required' needs at least one tool")
        schemas = [(f"tool {d.name!r}", d.parameters) for d in defs]
        try:
            compiled = self.cache.tools(defs, parallel_tool_calls)
        except ConstraintError as e:
            raise ConstraintError(f"{e}{self.explain(schemas)}") from None
        if mode == "auto":
            start: GrammarStart | None = GrammarStart(self.vocab.tools.calls_begin, feed=True, optional=True)
        else:
            start = GrammarStart(self.vocab.think_end_id, feed=False, optional=False) if thinking else None
        return self._processor(compiled, max_tokens, start, strict=mode != "auto", schemas=schemas)

    def for_response_format(self, response_format: Mapping[str, Any] | None, max_tokens: int = 256, *,
                            thinking: bool = False) -> GrammarProcessor | None:
        """{"type": "json_schema", "schema": {...}} (or OpenAI's {"type": "json_schema", "json_schema":
        {"name", "schema"}}), {"type": "json_object"}, or {"type": "text"} / None (no constraint)."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ConstraintError(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        schemas: list[tuple[str, Mapping[str, Any]]] = []
        if kind == "json_object":
            compiled = self.cache.json(None, "response_format")
        elif kind == "json_schema":
            holder = response_format.get("json_schema")
            schema = holder.get("schema") if isinstance(holder, Mapping) else response_format.get("schema")
            if schema is None:
                raise ConstraintError("response_format json_schema needs a 'schema'")
            schema = check_schema(schema, "response_format", want_object=False)
            compiled = self.cache.json(schema, "response_format")
            schemas = [("response_format", schema)]
        else:
            raise ConstraintError(f"response_format type must be 'json_schema', 'json_object' or 'text'; got {kind!r}")
        start = GrammarStart(self.vocab.think_end_id, feed=False, optional=False) if thinking else None
        return self._processor(compiled, max_tokens, start, strict=True, schemas=schemas)

    def _processor(self, compiled: Compiled, max_tokens: int, start: GrammarStart | None, strict: bool,
                   schemas: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> GrammarProcessor:
        if max_tokens < 1:
            raise ConstraintError(f"max_tokens must be >= 1, got {max_tokens}")
        try:
            proc = GrammarProcessor(self.vocab, self.planner, compiled, max_tokens=max_tokens, start=start,
                                    slack=self.slack, top_k=self.top_k)
        except ConstraintError as e:
            raise ConstraintError(f"{e}{self.explain(schemas)}") from None
        if strict and proc.min_tokens > max_tokens:
            raise ConstraintError(f"max_tokens={max_tokens} is too small: the shortest valid output needs "
                                  f"{proc.min_tokens} tokens{self.explain(schemas)}")
        return proc

    def explain(self, schemas: Sequence[tuple[str, Mapping[str, Any]]], most: int = 3) -> str:
        """'; minLength 5000 at #/properties/s (response_format) needs 81 tokens' for the size keywords that
        cost the most, each measured by planning its schema alone ('' when there are none)."""
        needs: list[tuple[int, str]] = []
        for where, schema in schemas:
            defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
            for path, keyword, value, node in size_keywords(schema)[:16]:
                try:
                    compiled = self.cache.json({**defs, **node}, where)
                    plan = self.planner.plan(xgr.GrammarMatcher(compiled.grammar), Lex())
                except (ConstraintError, RuntimeError):
                    continue
                tokens = f"{len(plan)} tokens" if plan is not None else (
                    f"more than the {self.planner.max_bytes} tokens the planner looks ahead")
                needs.append((len(plan) if plan is not None else 1 << 30,
                              f"{keyword} {value} at {path} ({where}) needs {tokens}"))
        needs.sort(key=lambda n: -n[0])
        return "".join(f"; {text}" for _, text in needs[:most])
